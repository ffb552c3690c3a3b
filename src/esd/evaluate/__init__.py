"""Generation and evaluation of (erased) models."""
