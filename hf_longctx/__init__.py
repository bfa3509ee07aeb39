"""hf-longctx: long context for Hugging Face Transformers causal LMs, in one line.

    import hf_longctx as lc
    lc.patch(model, attention="sink:4096")
    model.generate(...)
    lc.unpatch(model)

Importing the package registers the ``longctx_*`` attention implementations, so
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="longctx_sink")`` works too, and the
``longctx_*`` rope types, so a checkpoint saved with one loads with a plain ``from_pretrained``.
"""

from . import sparse, training
from .attention import register as _register_attention
from .cache import LongCtxCache, graph_generate
from .config import (KVEviction, LongCtxConfig, RopeScaling, SinkAttention, SoftplusAttention, SparseAttention,
                     Speculative)
from .patching import UnsupportedModelError, from_pretrained, patch, patched_config, unpatch
from .rope import register as _register_rope
from .speculative import speculative_generate

__version__ = "0.1.0"

_register_attention()
_register_rope()

__all__ = [
    "KVEviction",
    "LongCtxCache",
    "LongCtxConfig",
    "RopeScaling",
    "SinkAttention",
    "SoftplusAttention",
    "SparseAttention",
    "Speculative",
    "UnsupportedModelError",
    "__version__",
    "from_pretrained",
    "graph_generate",
    "patch",
    "patched_config",
    "sparse",
    "speculative_generate",
    "training",
    "unpatch",
]
