"""ESD: erase concepts from the weights of Stable Diffusion models (Gandikota et al., ICCV 2023)."""

__version__ = "0.1.0"
