"""`wbc-transfer app`: a local web page for lab staff (issue 24; docs/app.md).

- `registry`: the registered `wbc-classifier` versions and aliases, and a model's card (version,
  what it was trained on, its evaluation figures with intervals) read from the MLflow registry
  and the model's run; nothing is recomputed.
- `batch`: one upload of images (files, folders, zips) in a temporary folder, classified through
  `wbc_transfer.serving.predict.predict_items` (the CLI's own rows), thumbnails and Grad-CAM on demand
  through the model's `wbc_transfer.serving.classifier.Classifier`, corrections, and the exports (the
  predictions CSV with `corrected_label`, a labelled folder as a zip).
- `server`: the FastAPI application, its page (Jinja2 template + plain JavaScript) and the CLI.
"""
