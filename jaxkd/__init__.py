"""jaxkd: distil a teacher LLM into a small troubleshooting assistant with JAX/Flax NNX."""

__version__ = "0.1.0"
