"""capjax: image captioning with visual attention in JAX/Flax."""

__version__ = '0.1.0'
