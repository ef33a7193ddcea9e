# The code file of every wbc-classifier version logged before the package layout (issue 27): a
# copy of src/wbc_transfer/pyfunc_model.py at 0814e7e, kept as it was. MLflow runs this file when
# it loads such a model; tests/test_predict.py checks that it still loads and predicts.
"""MLflow models-from-code entry point of the `wbc-classifier` pyfunc (see wbc_transfer.serving).

MLflow copies this file into the logged model and executes it on load; `mlflow.models.set_model`
names the model object. The weights (a state_dict, loaded with ``weights_only=True``) and the
JSON config arrive as artifacts in `load_context`; nothing is unpickled.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class WBCClassifier(PythonModel):
    """Image bytes (column `image`) -> predicted white-blood-cell class and probabilities."""

    def load_context(self, context) -> None:
        from wbc_transfer.serving import Classifier

        self.classifier = Classifier.from_files(context.artifacts["weights"],
                                                context.artifacts["config"])

    # The pd.DataFrame hint tells MLflow to validate against the logged signature only.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from wbc_transfer.serving import input_values

        params = params or {}
        return self.classifier.predict_bytes(
            input_values(model_input), tta=bool(params.get("tta", False)),
            batch_size=max(1, int(params.get("batch_size", 32))),
            review_below=float(params.get("review_below", 0.0) or 0.0),
            sets=float(params.get("sets", 0.0) or 0.0),
        )


mlflow.models.set_model(WBCClassifier())
