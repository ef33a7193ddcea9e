"""wbc-transfer: white-blood-cell classification by transfer learning."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
