"""Plain-PyTorch semantics oracle: entmax, page bounds, key sketches, decode policies, certificate."""

from .entmax import entmax, entmax15, entmax_probs, entmax_threshold, sparsemax

__all__ = ["entmax", "entmax15", "entmax_probs", "entmax_threshold", "sparsemax"]
