"""entmaxkv-compile: a torch.compile backend that makes entmax-attention decoding sparse and exact."""

from .config import EntmaxKVConfig

__all__ = ["EntmaxKVConfig"]
__version__ = "0.1.0"
