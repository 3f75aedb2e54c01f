"""Plain-PyTorch semantics oracle: entmax, page bounds, key sketches, decode policies, certificate."""

from .decode import DecodeStats, attention_scores, decode_attention, dense_decode
from .entmax import entmax, entmax15, entmax_probs, entmax_threshold, sparsemax
from .pages import group_bound, num_pages, page_counts, page_metadata, page_upper_bound
from .sketch import KeySketch, build_sketch, sketch_score_bounds

__all__ = [
    "DecodeStats",
    "KeySketch",
    "attention_scores",
    "build_sketch",
    "decode_attention",
    "dense_decode",
    "entmax",
    "entmax15",
    "entmax_probs",
    "entmax_threshold",
    "group_bound",
    "num_pages",
    "page_counts",
    "page_metadata",
    "page_upper_bound",
    "sketch_score_bounds",
    "sparsemax",
]
