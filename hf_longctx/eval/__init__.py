"""Long-context evaluations: perplexity vs length, passkey retrieval, the needle-in-a-haystack grid, and
draft/target top-1 agreement.

Each takes any Hugging Face causal LM (patched by hf-longctx or not) and returns a result object with
``to_markdown()``, ``to_dict()`` and ``plot(path)``; ``save_result`` writes all three. The
``hf-longctx eval`` command (``command.py``) runs them on a checkpoint and records how.
"""

from .agreement import AgreementResult, draft_agreement
from .corpus import Document, iter_documents
from .perplexity import DEFAULT_MAX_TOKENS, PerplexityResult, check_lengths, estimate_memory_bytes, perplexity_vs_length
from .report import save_result
from .retrieval import NEEDLE_DEPTHS, PASSKEY_DEPTHS, RetrievalResult, needle_grid, passkey_accuracy

__all__ = [
    "AgreementResult",
    "DEFAULT_MAX_TOKENS",
    "Document",
    "NEEDLE_DEPTHS",
    "PASSKEY_DEPTHS",
    "PerplexityResult",
    "RetrievalResult",
    "check_lengths",
    "draft_agreement",
    "estimate_memory_bytes",
    "iter_documents",
    "needle_grid",
    "passkey_accuracy",
    "perplexity_vs_length",
    "save_result",
]
