"""jaxalign: aligning language models with human and programmatic feedback in JAX / Flax NNX."""

__version__ = "0.1.0"
