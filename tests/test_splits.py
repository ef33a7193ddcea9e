"""Split manifests: deterministic, stratified, disjoint; heldout test is the whole TEST folder."""

from __future__ import annotations

import pandas as pd
import pytest

from wbc_transfer.splits import SplitError, counts, heldout_split, paper_split
from wbc_transfer.stages import split as split_stage
from wbc_transfer.stages import validate as validate_stage

from conftest import CLASSES, IMAGES_SUBDIR, load_params, write_params


@pytest.fixture(scope="module")
def index(mini_dataset, tmp_path_factory) -> pd.DataFrame:
    """data/index.csv of the mini copy, written by the validate stage."""
    params = load_params(write_params(tmp_path_factory.mktemp("split-repo"), mini_dataset))
    validate_stage.main(params)
    return pd.read_csv(params.resolve(params.validate.index))


def _paper(index, seed=42, per_class=20, val=3, fraction=0.3):
    return paper_split(index, CLASSES, per_class, fraction, val, seed)


def _heldout(index, seed=42, train=10, val=3):
    return heldout_split(index, CLASSES, train, val, seed)


def test_same_seed_same_manifests(index):
    pd.testing.assert_frame_equal(_paper(index), _paper(index))
    pd.testing.assert_frame_equal(_heldout(index), _heldout(index))
    # the input order of the index does not matter either
    shuffled = index.sample(frac=1, random_state=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(_paper(index), _paper(shuffled))
    pd.testing.assert_frame_equal(_heldout(index), _heldout(shuffled))


def test_different_seed_different_manifests(index):
    a, b = _paper(index, seed=1), _paper(index, seed=2)
    for part in ("train", "test", "val"):
        assert set(a[a.split == part].path) != set(b[b.split == part].path), part
    c, d = _heldout(index, seed=1), _heldout(index, seed=2)
    assert set(c[c.split == "train"].path) != set(d[d.split == "train"].path)


def test_paper_is_stratified_70_30_plus_val(index):
    manifest = _paper(index)
    assert list(manifest.columns) == ["path", "label", "split"]
    assert counts(manifest) == {
        "train": {c: 14 for c in CLASSES},
        "test": {c: 6 for c in CLASSES},
        "val": {c: 3 for c in CLASSES},
    }
    # every image comes from TRAIN, with the label of its folder
    folder = index.set_index("path")["folder"]
    assert (folder[manifest["path"]] == "TRAIN").all()
    assert (manifest["path"].str.split("/").str[1] == manifest["label"]).all()


@pytest.mark.parametrize("per_class,fraction,n_test", [(10, 0.3, 3), (30, 0.2, 6), (40, 0.5, 20)])
def test_paper_test_fraction_per_class(index, per_class, fraction, n_test):
    manifest = _paper(index, per_class=per_class, fraction=fraction, val=0)
    assert counts(manifest) == {
        "train": {c: per_class - n_test for c in CLASSES},
        "test": {c: n_test for c in CLASSES},
    }


def test_no_file_in_two_splits(index):
    for manifest in (_paper(index), _heldout(index)):
        assert not manifest["path"].duplicated().any()
        groups = {s: set(g) for s, g in manifest.groupby("split")["path"]}
        names = sorted(groups)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not groups[a] & groups[b], (a, b)


def test_heldout_test_is_the_whole_test_folder(index, mini_dataset):
    manifest = _heldout(index)
    on_disk = {
        p.relative_to(mini_dataset / IMAGES_SUBDIR).as_posix()
        for p in (mini_dataset / IMAGES_SUBDIR / "TEST").rglob("*.jpeg")
    }
    assert len(on_disk) == 4 * 12
    assert set(manifest[manifest.split == "test"].path) == on_disk
    assert counts(manifest) == {
        "train": {c: 10 for c in CLASSES},
        "val": {c: 3 for c in CLASSES},
        "test": {c: 12 for c in CLASSES},
    }
    assert "test_simple" not in set(manifest["split"])
    train_val = manifest[manifest.split.isin(["train", "val"])].path
    assert train_val.str.startswith("TRAIN/").all()


def test_heldout_includes_test_simple_when_present(tmp_path, kaggle_copy, make_params):
    root = kaggle_copy(tmp_path / "blood-cells", train_per_class=23, test_per_class=3,
                       test_simple_per_class=2)
    params = make_params(root)
    validate_stage.main(params)
    report = split_stage.main(params)
    heldout = pd.read_csv(params.resolve(params.split.out_dir) / "heldout.csv")
    simple = heldout[heldout.split == "test_simple"]
    on_disk = {
        p.relative_to(params.images_dir).as_posix()
        for p in (params.images_dir / "TEST_SIMPLE").rglob("*.jpeg")
    }
    assert len(on_disk) == 8 and set(simple.path) == on_disk
    assert report["counts"]["heldout"]["test_simple"] == {c: 2 for c in CLASSES}
    # the paper protocol never touches TEST or TEST_SIMPLE
    paper = pd.read_csv(params.resolve(params.split.out_dir) / "paper.csv")
    assert paper.path.str.startswith("TRAIN/").all()


def test_asking_for_more_images_than_available_is_a_clear_error(index):
    with pytest.raises(SplitError, match=r"split\.paper\.per_class: asked for 41 images of "
                                         r"EOSINOPHIL, only 40 available"):
        _paper(index, per_class=41)
    with pytest.raises(SplitError, match=r"split\.paper\.val_per_class: asked for 25 .*only 20"):
        _paper(index, per_class=20, val=25)
    with pytest.raises(SplitError, match=r"split\.heldout train\+val: asked for 41 .*only 40"):
        _heldout(index, train=30, val=11)
    # a class missing from TRAIN entirely: the error still names it
    no_mono = index[~((index.folder == "TRAIN") & (index.label == "MONOCYTE"))]
    with pytest.raises(SplitError, match="asked for 20 images of MONOCYTE, only 0 available"):
        _paper(no_mono)
    with pytest.raises(SplitError, match="asked for 13 images of MONOCYTE, only 0 available"):
        _heldout(no_mono)
    with pytest.raises(SplitError, match="TEST folder has no usable images"):
        _heldout(index[index.folder != "TEST"])


def test_split_stage_writes_the_manifests_it_reports(index, mini_dataset, make_params):
    params = make_params(mini_dataset, split__seed=7)
    validate_stage.main(params)
    report = split_stage.main(params)
    out = params.resolve(params.split.out_dir)
    paper = pd.read_csv(out / "paper.csv")
    heldout = pd.read_csv(out / "heldout.csv")
    pd.testing.assert_frame_equal(paper, _paper(index, seed=7))
    pd.testing.assert_frame_equal(heldout, _heldout(index, seed=7))
    assert report["counts"] == {"paper": counts(paper), "heldout": counts(heldout)}
