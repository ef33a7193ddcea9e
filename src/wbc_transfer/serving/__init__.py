"""Serving: the champion as an MLflow pyfunc that owns its preprocessing (`classifier`), its
packaging and registration (`pyfunc`, `pyfunc_model`), and `wbc-transfer predict` (`inputs`,
`loading`, `predict`).

Registered models carry their own copy of `pyfunc_model.py`, and the copies logged before the
package layout import ``Classifier`` and ``input_values`` from `wbc_transfer.serving`: these two
names stay importable from here so that every model version ever registered still loads
(tests/test_predict.py::test_pyfunc_code_of_earlier_versions_still_loads). They are resolved on
first use, so that `wbc-transfer --help` (which reads `serving.predict`'s arguments) does not
import torch.
"""

from typing import Any

__all__ = ["Classifier", "input_values"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wbc_transfer.serving import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
