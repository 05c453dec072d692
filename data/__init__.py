"""Images and datasets: the toy data, loading and pairing with Grad-CAM maps, converters of the real datasets."""
