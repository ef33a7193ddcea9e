"""Fetch the public Kaggle dataset for users without the local mirror."""

from __future__ import annotations


def download(dataset: str = "paultimothymooney/blood-cells") -> str:
    """Download (or reuse kagglehub's cache) and return the local folder of the archive.

    Point the pipeline at it with
    `dvc import-url --force <printed folder> data/blood-cells && dvc unfreeze data.dvc`
    or run with `-S data.root=<printed folder>`.
    """
    try:
        import kagglehub
    except ImportError as exc:
        raise RuntimeError("kagglehub is not installed: pip install -e '.[kaggle]'") from exc
    return str(kagglehub.dataset_download(dataset))
