"""The champion as an MLflow pyfunc that owns its preprocessing: image bytes in, class out.

The registered model (`models:/wbc-classifier@champion`) is an MLflow *models-from-code*
pyfunc: its MLmodel names the Python file `pyfunc_model.py` (copied into the model folder),
and two artifacts travel with it:

- ``weights.pt``: the network's ``state_dict``, loaded with ``torch.load(weights_only=True)``
  (tensors only; no pickled classes are ever rebuilt);
- ``config.json``: architecture, image_size, mean, std, classes, temperature (the scalar fitted
  on the validation cells at training time; probabilities are softmax(logits / temperature)), and
  the robustness options stain_norm, norm_layer (their statistics are buffers in the weights),
  and for a model adapted to a lab (`wbc-transfer adapt`) its split-conformal calibration
  ``conformal`` (wbc_transfer.evaluation.conformal). Any other key of the config travels with it.

The network is rebuilt from code with ``wbc_transfer.models.registry.rebuild(config, state)``, so
the serving environment needs this package installed (``--env-manager local``).

Input: a DataFrame with one column ``image`` of raw image bytes or base64 text (over HTTP: the
base64 strings of a ``dataframe_split``/``dataframe_records`` payload). The signature declares
the column as ``string``, not ``binary``: for a binary column MLflow's scoring server decodes
the base64 of the whole batch itself and answers 400 for all of it when one row is not valid
base64; here each row is decoded on its own. Output: one row per input row with
``predicted``, ``confidence`` (calibrated top probability), ``p_<class>`` for every class,
``review`` (true when the confidence is below the ``review_below`` param: send to a person),
``set`` (only with the ``sets`` param, a confidence level such as 0.9: the list of classes of the
image's split-conformal prediction set; models without a calibration refuse it), ``note``
(what was converted, e.g. EXIF orientation applied, grayscale to RGB) and ``error`` (why the
row could not be classified, e.g. not valid base64); a bad row never fails the batch. Decoding
is `wbc_transfer.data.images`, the decoder of every pipeline stage. Params: ``tta`` (horizontal-flip
average), ``batch_size``, ``review_below`` (0: nothing flagged), ``sets`` (0: no `set` column).

Trust: loading runs ``pyfunc_model.py`` from the model folder (as any models-from-code model
does: the artifact store must be as trusted as the code it holds), reads MLmodel/JSON and
loads the weights with ``weights_only=True``. Nothing is unpickled: no cloudpickle'd Python
model (MLflow refuses those unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set), and
`wbc_transfer.serving.predict` refuses models that do not carry this module's metadata marker before
loading them. Image decoding (Pillow) only ever sees bytes, never a file path from a request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wbc_transfer.data.images import ImageError, decode, joined, large_image_note

log = logging.getLogger(__name__)

INPUT_COLUMN = "image"

CONFIG_KEYS = ("architecture", "image_size", "mean", "std", "classes")
OPTIONAL_CONFIG = {"temperature": 1.0}  # older models: uncalibrated
# robustness options (wbc_transfer.models.robustness): kept when present; absent = none / batchnorm;
# `conformal`: the prediction-set calibration of an adapted model (wbc_transfer.evaluation.conformal)
OPTIONAL_CONFIG_KEYS = ("stain_norm", "norm_layer", "conformal")
# the network's view (wbc_transfer.data.cells.model_view): kept when present; absent = the whole image
VIEW_CONFIG_KEYS = ("view", "cell_fraction")


# ---------------------------------------------------------------------------------------------
# preprocessing: decoding is `wbc_transfer.data.images.decode`, the decoder of every stage


def as_bytes(value: Any) -> bytes:
    """A cell of the input column -> bytes (raw bytes, or a base64 string). Raises ImageError
    (the row's `error`) for invalid base64, null or another type."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    if isinstance(value, str):
        try:  # strict, but line breaks are fine (base64.encodebytes, MLflow's client, add them)
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"string input is not valid base64: {exc}") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ImageError("no image data (null)")
    raise ImageError(f"unsupported input type {type(value).__name__}; send image bytes")


# ---------------------------------------------------------------------------------------------
# the classifier


def read_config(file: str | Path) -> dict[str, Any]:
    config = json.loads(Path(file).read_text())
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{file}: config lacks {missing}")
    config = {**OPTIONAL_CONFIG, **config}
    if not float(config["temperature"]) > 0:
        raise ValueError(f"{file}: temperature must be > 0, got {config['temperature']!r}")
    return config


@dataclass
class Classifier:
    """A rebuilt network plus its preprocessing; `predict_bytes` is the whole inference path."""

    model: torch.nn.Module
    config: dict[str, Any]
    device: torch.device

    @classmethod
    def from_files(cls, weights: str | Path, config: str | Path,
                   device: str | torch.device | None = None) -> Classifier:
        from wbc_transfer.models import registry as models

        cfg = read_config(config)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = models.rebuild(cfg, state)  # with its stain-normalisation layer, if trained so
        torch.set_flush_denormal(True)  # as in training; denormals slow CPU inference a lot
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model=model.to(dev).eval(), config=cfg, device=dev)

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def columns(self) -> list[str]:
        return output_columns(self.classes)

    def preprocess(self, data: bytes) -> tuple[torch.Tensor, str]:
        """Image bytes -> (uint8 3 x S x S model input, note): the product's decoder, then the
        view the model was trained on (`wbc_transfer.data.cells.model_view`, as the `prepare` stage
        makes it: the whole image resized, or the white cell cropped and scaled). Raises
        ImageError for bytes that are not a readable image."""
        from wbc_transfer.config import CELL_FRACTION
        from wbc_transfer.data.cells import model_view

        image, note = decode(data)
        note = joined(note, large_image_note(int(image.shape[-1]), int(image.shape[-2])))
        pixels, view_note, _ = model_view(image, int(self.config["image_size"]),
                                          self.config.get("view", "full"),
                                          float(self.config.get("cell_fraction", CELL_FRACTION)))
        return pixels, joined(note, view_note)

    @property
    def temperature(self) -> float:
        return float(self.config.get("temperature", 1.0))

    def _calibrated(self, logits: torch.Tensor, x: torch.Tensor, tta: bool) -> torch.Tensor:
        """softmax(log p / temperature), p the softmax of `logits` (averaged with the flipped
        image's under `tta`): the evaluate stage's calibrated probabilities."""
        from wbc_transfer.engine import logits_of

        if tta:
            flipped = logits_of(self.model(torch.flip(x, dims=[3]))).float()
            logits = torch.log((logits.softmax(1) + flipped.softmax(1)) / 2)
        return torch.softmax(logits / self.temperature, dim=1)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Calibrated float N x K probabilities of uint8 N x 3 x S x S images."""
        from wbc_transfer.data.sets import normalise
        from wbc_transfer.engine import logits_of

        x = normalise(images, self.config["mean"], self.config["std"]).to(self.device)
        return self._calibrated(logits_of(self.model(x)).float(), x, tta).cpu()

    def probabilities_and_cams(self, images: torch.Tensor,
                               tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`probabilities` and the Grad-CAM map (float N x S x S in [0, 1]) of each image's
        predicted class, from one forward and one backward pass (`wbc_transfer.evaluation.explain`)."""
        from wbc_transfer.data.sets import normalise
        from wbc_transfer.evaluation import explain
        from wbc_transfer.models import registry as models

        x = normalise(images, self.config["mean"], self.config["std"]).to(self.device)
        layer = models.cam_layer(self.config["architecture"], self.model)
        logits, cams = explain.grad_cam(self.model, layer, x)
        with torch.inference_mode():
            probs = self._calibrated(logits.to(self.device), x, tta).cpu()
        if tta:  # the flipped image may change the top class: explain the class predicted
            changed = (probs.argmax(1) != logits.argmax(1)).nonzero().flatten()
            if len(changed):
                _, redo = explain.grad_cam(self.model, layer, x[changed], probs.argmax(1)[changed])
                cams[changed] = redo
        return probs, cams

    def predict_bytes(self, values: Iterable[Any], tta: bool = False, batch_size: int = 32,
                      review_below: float = 0.0, sets: float = 0.0) -> pd.DataFrame:
        """One output row per input value; undecodable inputs get an `error`, never raise.
        `review` is true where the calibrated confidence is below `review_below`; with `sets`
        (a confidence level in (0, 1)) a `set` column lists the classes of each image's
        split-conformal prediction set (`wbc_transfer.evaluation.conformal`). Raises NoCalibrationError
        when sets are asked of a model without a conformal calibration."""
        return self.classify_bytes(values, tta, batch_size, review_below, sets=sets)[0]

    def check_sets(self, sets: float) -> None:
        """Raise (NoCalibrationError, ValueError) unless prediction sets at `sets` can be made."""
        from wbc_transfer.evaluation import conformal

        if sets:
            conformal.prediction_sets(np.full((1, len(self.classes)), 1 / len(self.classes)),
                                      self.config.get("conformal"), sets)

    def classify_bytes(self, values: Iterable[Any], tta: bool = False, batch_size: int = 32,
                       review_below: float = 0.0, explain: bool = False, sets: float = 0.0,
                       ) -> tuple[pd.DataFrame, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """`predict_bytes`'s rows and, with `explain`, row index -> (the uint8 3 x S x S image
        the network saw, its Grad-CAM map S x S) for every classified row."""
        from wbc_transfer.evaluation import conformal

        self.check_sets(sets)
        columns = output_columns(self.classes, bool(sets))
        rows: list[dict[str, Any]] = []
        pending: list[tuple[int, torch.Tensor]] = []
        maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def flush() -> None:
            if not pending:
                return
            batch = torch.stack([t for _, t in pending])
            try:
                if explain:
                    probs_t, cams = self.probabilities_and_cams(batch, tta)
                    maps.update({i: (t, cam) for (i, t), cam in zip(pending, cams, strict=True)})
                else:
                    probs_t = self.probabilities(batch, tta)
                probs = probs_t.numpy()
            except Exception as exc:  # e.g. out of memory: the rows fail, the batch goes on
                for i, _ in pending:
                    rows[i].update(error=f"inference failed: {type(exc).__name__}: {exc}")
            else:
                members = (conformal.prediction_sets(probs, self.config["conformal"], sets)
                           if sets else [None] * len(probs))
                for (i, _), p, inside in zip(pending, probs, members, strict=True):
                    best = int(p.argmax())
                    rows[i].update(predicted=self.classes[best], confidence=float(p[best]),
                                   review=bool(p[best] < review_below),
                                   **{f"p_{c}": float(v) for c, v in zip(self.classes, p,
                                                                         strict=True)})
                    if sets:
                        rows[i]["set"] = [c for c, k in zip(self.classes, inside, strict=True) if k]
            pending.clear()

        for value in values:
            row: dict[str, Any] = dict.fromkeys(columns)
            row.update(note="", error="")
            rows.append(row)
            try:
                tensor, row["note"] = self.preprocess(as_bytes(value))
            except ImageError as exc:
                row["error"] = str(exc)
                continue
            except Exception as exc:  # anything unforeseen stays in its row
                row["error"] = f"{type(exc).__name__}: {exc}"
                continue
            pending.append((len(rows) - 1, tensor))
            if len(pending) >= batch_size:
                flush()
        flush()
        frame = pd.DataFrame(rows, columns=columns).astype(object)
        return frame.where(frame.notna(), None), maps  # JSON null, not NaN, for failed rows


def output_columns(classes: Sequence[str], sets: bool = False) -> list[str]:
    """The pyfunc's output columns; `set` (a list of class names) only when sets are asked."""
    return ["predicted", "confidence", *[f"p_{c}" for c in classes], "review",
            *(["set"] if sets else []), "note", "error"]


def input_values(frame: pd.DataFrame | Any) -> list[Any]:
    """The image column of a pyfunc input (DataFrame, dict, list of bytes)."""
    if isinstance(frame, pd.DataFrame):
        column = INPUT_COLUMN if INPUT_COLUMN in frame.columns else frame.columns[0]
        return frame[column].tolist()
    if isinstance(frame, dict):
        return list(frame.get(INPUT_COLUMN, next(iter(frame.values()), [])))
    if isinstance(frame, bytes | str):
        return [frame]
    return list(frame)
