"""Reporting: the comparison of the trained models and the Markdown reports built from it."""
