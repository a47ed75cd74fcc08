"""Image decoding, preprocessing transforms and datasets."""
