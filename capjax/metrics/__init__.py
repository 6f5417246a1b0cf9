"""Caption metrics: the COCO evaluation, and CIDEr-D in JAX."""
