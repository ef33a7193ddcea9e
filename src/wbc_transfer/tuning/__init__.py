"""Tuning: the Optuna study of the tune stage."""
