"""The Compressive Transformer (Rae et al. 2019) on Transformer-XL (Dai et al. 2019)."""

from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveConfig, CompressiveTransformer, ModelOutput

__all__ = ["CompressiveConfig", "CompressiveTransformer", "MemoryState", "ModelOutput"]
