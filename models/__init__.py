"""Neural network backbones."""
from .dit import DiT

__all__ = ['DiT']
