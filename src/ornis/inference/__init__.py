"""Inference: one image (``ornis.inference.classification``), collections (the batch runner,
``ornis.inference.batch``), and the preprocessing both share (``ornis.inference.preprocess``)."""
