"""HieraDet (the SAM 2 image-encoder trunk) and its dynamic-window-size variant. Written in the Hiera issue."""
