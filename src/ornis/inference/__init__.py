"""Inference: one image (``ornis.inference.classification``) and collections (the batch runner)."""
