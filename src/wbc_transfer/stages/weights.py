"""DVC stage `weights` (`wbc-transfer check-weights`): before any training, find out which
weights every architecture of `train.architectures` will start from.

- `train.weights: imagenet` (or a file): every architecture's weights are found (downloaded
  through torchvision's weights API where there is internet), read and checked against the
  network; if any cannot be had the stage fails with ONE message listing every missing or
  broken file, so `dvc repro` stops before the first training starts.
- `auto` / `none`: records what each architecture will get (ImageNet, or random initialisation
  and why) and never fails.

The quick run (`dvc repro`) trains only the architectures of `train.architectures`, by default
EfficientNet-Lite0, whose ImageNet weights ship in a pip package and so are present offline on
every fresh clone. The paper's four torchvision networks need downloaded files; trained from
random initialisation their rows measure nothing, so they are left out, and the stage prints a
notice (`paper_networks_notice`): where their files are missing, `wbc-transfer fetch-weights`;
where present, the command that adds them. The notice is not in the report, so getting a file
retrains nothing.

Output `train.weights_report` (JSON): the policy and, per architecture, the weights source the
train stage will record, and the file's name, size and SHA-256. The train stages depend on it,
so they rerun when the weights they would get change. The weights cache lies outside the
repository, so the stage runs on every `dvc repro` (`always_changed`); it costs a read and a
hash of each file, about 2 s for all five.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wbc_transfer.config import Params
from wbc_transfer.io import file_sha256, write_json
from wbc_transfer.models import registry as models

log = logging.getLogger(__name__)


def _file(name: str, policy: str) -> Path | None:
    if policy == "none":
        return None
    if policy in {"imagenet", "auto"}:
        return models.REGISTRY[name].weights_file()
    return Path(policy).expanduser()


def missing_message(policy: str, failures: dict[str, models.WeightsUnavailableError],
                    total: int) -> str:
    """The one message that lists every architecture whose weights cannot be had."""
    lines = [f"train.weights={policy}, but {len(failures)} of {total} architecture(s) have no "
             "usable weights; stopped before any training:"]
    for name, exc in failures.items():
        lines.append(f"  {name}: {exc.file or '-'}: {exc.problem}")
    lines += [
        f"Cache folder: {models.torch_home()} (set TORCH_HOME to move it). On a machine with "
        "internet run `wbc-transfer fetch-weights` and copy that folder here (`wbc-transfer "
        "fetch-weights --check` verifies it offline),",
        "or run with random initialisation recorded as such: dvc exp run -S train.weights=auto "
        "(or -S train.weights=none).",
    ]
    return "\n".join(lines)


def paper_networks_notice(params: Params) -> str | None:
    """The notice about the paper's networks that train.architectures leaves out (None when it
    has them all): whose ImageNet files are missing from the cache (and the command that gets
    them) and whose are present (and the command that trains them)."""
    left_out = [n for n in models.PAPER_NETWORKS if n not in params.train.architectures]
    if not left_out:
        return None
    missing = [n for n in left_out if not models.REGISTRY[n].weights_file().is_file()]
    present = [n for n in left_out if n not in missing]
    every = ",".join([*params.train.architectures, *left_out])
    lines = [f"The quick run trains {', '.join(params.train.architectures)} only (train.architectures)."]
    if missing:
        lines.append(
            f"Not trained: {', '.join(missing)}: their ImageNet weights are not in "
            f"{models.torch_home()}, and from random initialisation they would measure nothing. "
            "Get them with `wbc-transfer fetch-weights` (on a machine with internet; copy that "
            "folder here for an offline machine, `wbc-transfer fetch-weights --check` verifies it).")
    if present:
        lines.append(f"ImageNet weights present for {', '.join(present)}: train them too with "
                     f"`dvc exp run -S 'train.architectures=[{every}]'` (or `make paper`).")
    return "\n".join(lines)


def main(params: Params) -> dict[str, Any]:
    """Probe the weights of every configured architecture; write and return the report.
    Raises WeightsUnavailableError listing every failure (policy imagenet or a file)."""
    policy = params.train.weights
    entries: dict[str, dict[str, Any]] = {}
    failures: dict[str, models.WeightsUnavailableError] = {}
    for name in params.train.architectures:
        entry: dict[str, Any] = {}
        try:
            entry["weights_source"] = models.probe(name, "imagenet" if policy == "auto" else policy)
        except models.WeightsUnavailableError as exc:
            if policy != "auto":
                failures[name] = exc
                continue
            log.warning("%s: %s; it will train from RANDOM initialisation (train.weights=auto)",
                        name, exc.problem)
            entry.update(weights_source=models.RANDOM_FALLBACK, problem=exc.problem)
        file = _file(name, policy)
        if file is not None:
            entry["file"] = file.name
            if file.is_file():
                entry.update(size=file.stat().st_size, sha256=file_sha256(file))
        log.info("%s: %s", name, entry["weights_source"])
        entries[name] = entry
    if failures:
        raise models.WeightsUnavailableError(
            missing_message(policy, failures, len(params.train.architectures)))
    report = {"policy": policy, "architectures": entries}
    write_json(params.resolve(params.train.weights_report), report)
    notice = paper_networks_notice(params)
    if notice:
        log.warning("%s", notice)
    return report
