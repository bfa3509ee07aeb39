"""Dynamic block-sparse prefill: per-head pattern estimation and calibration (``lc.sparse.calibrate``)."""

from .calibrate import calibrate, head_patterns_for, sparse_index
from .estimate import PATTERNS, SparseIndex, block_topk_index, dense_index, last_query_attention, vertical_slash_index

__all__ = [
    "PATTERNS",
    "SparseIndex",
    "block_topk_index",
    "calibrate",
    "dense_index",
    "head_patterns_for",
    "last_query_attention",
    "sparse_index",
    "vertical_slash_index",
]
