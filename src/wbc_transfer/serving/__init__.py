"""Serving: the champion as an MLflow pyfunc (classifier, packaging, registry) and `predict`.

Registered models carry their own copy of `pyfunc_model.py`, and the copies logged before the
package layout import ``Classifier`` and ``input_values`` from `wbc_transfer.serving`: these names
stay exported here so that every model version ever registered still loads
(tests/test_predict.py::test_pre_layout_pyfunc_code_loads).
"""

from wbc_transfer.serving.classifier import Classifier, input_values

__all__ = ["Classifier", "input_values"]
