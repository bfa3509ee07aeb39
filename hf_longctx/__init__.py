"""hf-longctx: long context for Hugging Face Transformers causal LMs, in one line.

    import hf_longctx as lc
    lc.patch(model, attention="sink:4096")
    model.generate(...)
    lc.unpatch(model)

Importing the package registers the ``longctx_*`` attention implementations, so
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="longctx_sink")`` works too.
"""

from .attention import register as _register_attention
from .cache import LongCtxCache
from .config import KVEviction, LongCtxConfig, SinkAttention
from .patching import UnsupportedModelError, from_pretrained, patch, patched_config, unpatch

__version__ = "0.1.0"

_register_attention()

__all__ = [
    "KVEviction",
    "LongCtxCache",
    "LongCtxConfig",
    "SinkAttention",
    "UnsupportedModelError",
    "__version__",
    "from_pretrained",
    "patch",
    "patched_config",
    "unpatch",
]
