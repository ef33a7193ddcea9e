"""Data: the one image decoder, the data checks, cell groups and splits, other labs' sets, cell
localisation and the decoded-image sets that training and evaluation index."""
