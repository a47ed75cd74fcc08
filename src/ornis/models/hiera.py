"""Hiera (MAE-style hierarchical ViT) with absolute-window position embedding. Written in the Hiera issue."""
