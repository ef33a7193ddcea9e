"""One module per DVC stage; each exposes `main(params)` and is dispatched by `wbc-transfer`."""
