"""Configuration: ``LongCtxConfig`` and one dataclass per feature.

A feature is given to :func:`hf_longctx.patch` in any of three spellings, all normalised here to
its dataclass:

- the dataclass itself: ``SinkAttention(sink_tokens=4, window=4096)``;
- a dict, as stored in ``config.json``: ``{"type": "sink", "sink_tokens": 4, "window": 4096}``;
- a shorthand string: ``"sink"``, ``"sink:2048"`` (positional values fill the feature's
  ``shorthand_fields`` in order), ``"sink:window=2048,sink_tokens=8"``.

``LongCtxConfig.to_dict()`` is what :func:`hf_longctx.patch` writes to ``model.config.longctx``, so
``save_pretrained`` keeps it and :func:`hf_longctx.from_pretrained` re-applies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

FEATURE_KINDS = ("attention", "rope", "kv", "speculative")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r}")


SINK_POSITIONS = ("original", "cache")


@dataclass(frozen=True)
class SinkAttention:
    """Causal attention over the first ``sink_tokens`` tokens plus the most recent ``window`` tokens.

    Attributes:
        sink_tokens: initial tokens every query attends to ("attention sinks"); >= 0.
        window: recent tokens a query attends to, itself included; >= 1. A window at least as
            long as the sequence is exact (dense) causal attention.
        positions: the RoPE distance at which a query at position i sees a sink t that lies beyond its
            window (i - t >= window); keys inside the window always keep their true distances.
            ``"original"``: the true distance i - t, or min(i - t, ``distance_limit``) with a limit
            (LM-Infinite's Lambda-shaped mask). ``"cache"``: positions counted inside a cache of the
            sinks and the window (StreamingLLM): sinks at 0 .. sink_tokens - 1 and the window right after
            them, i.e. distance min(i, sink_tokens + window - 1) - t, so no distance reaches
            sink_tokens + window.
        distance_limit: ``positions="original"`` only: the largest distance a sink is seen at, in tokens;
            None for no limit, else >= ``window`` (every distance then stays within the limit, as in
            LM-Infinite, where it is the trained length and equals the window).

    Layers that already have a sliding window of their own (Gemma 2's local layers, Mistral with
    ``sliding_window`` set) keep it unchanged; the feature applies to full-attention layers.
    """

    sink_tokens: int = 4
    window: int = 4096
    positions: str = "original"
    distance_limit: int | None = None

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "sink"
    shorthand_fields: ClassVar[tuple[str, ...]] = ("window", "sink_tokens")
    # Left out of the config.json form while at their defaults, so configs saved before they existed are unchanged.
    omitted_at_default: ClassVar[tuple[str, ...]] = ("positions", "distance_limit")

    def __post_init__(self) -> None:
        owner = "SinkAttention"
        _check_int(owner, "sink_tokens", self.sink_tokens, 0)
        _check_int(owner, "window", self.window, 1)
        if self.positions not in SINK_POSITIONS:
            raise ValueError(f"{owner}: unknown `positions` {self.positions!r}; accepted: {', '.join(SINK_POSITIONS)}")
        if self.distance_limit is None:
            return
        if self.positions != "original":
            raise ValueError(
                f"{owner}: `distance_limit` applies to positions='original' only; positions={self.positions!r} "
                "already keeps every distance below sink_tokens + window"
            )
        if isinstance(self.distance_limit, bool) or not isinstance(self.distance_limit, int) or (
            self.distance_limit < self.window
        ):
            raise ValueError(
                f"{owner}: `distance_limit` must be None or an integer >= window ({self.window}), so that every "
                f"distance stays within it, got {self.distance_limit!r}"
            )


KV_POLICIES = ("streaming", "snapkv", "h2o", "tova", "pyramidkv", "kvcrush", "think")
# Policies that score tokens by themselves; kvcrush and think build on one of them (`base`).
KV_BASE_POLICIES = ("streaming", "snapkv", "h2o", "tova")


def _check_fraction(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{owner}: `{name}` must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class KVEviction:
    """Evict KV-cache entries of the full-attention layers down to a token budget (see ``hf_longctx.cache``).

    The shorthand name is the policy: ``"snapkv:2048"`` is ``KVEviction(policy="snapkv", budget=2048)``.

    Attributes:
        policy: which tokens to keep, always the first ``sink_tokens`` and the last ``recent`` real tokens plus:
            ``"streaming"`` the most recent others (StreamingLLM); ``"snapkv"`` the most attended by the
            last ``window`` queries of the prompt, pooled along the keys (SnapKV); ``"h2o"`` the most attended
            by all queries so far (H2O); ``"tova"`` the most attended by the latest query, averaged over heads
            (TOVA); ``"pyramidkv"`` snapkv with per-layer budgets falling linearly from 1.5x to 0.5x
            ``budget`` (PyramidKV); ``"kvcrush"`` the ``base`` policy's choice for part of the budget and,
            for the other ``representatives`` part, one token per group of evicted tokens with similar
            per-head attention (KVCrush); ``"think"`` the ``base`` policy's tokens with only a ``channels``
            fraction of the key channels stored (ThinK).
        budget: tokens each layer keeps after an eviction (per sequence and key/value head); >= 1.
        ratio: the budget as a fraction in (0, 1] of the tokens seen by the end of the latest prefill
            (padding included, so every row of a batch has the same budget). Exactly one of ``budget``
            and ``ratio`` (``think`` may have neither: then it evicts no tokens; ``streaming`` may have
            neither beside a sink attention, which then sets them: see :func:`kv_for_attention`).
        sink_tokens: first real tokens always kept; >= 0.
        recent: last real tokens always kept; >= 0. Default: ``window`` (0 for ``streaming``, which
            prefers recent tokens anyway).
        window: observation window: how many of the latest queries score the keys at a prefill; >= 1.
        pooling: odd kernel size (tokens) of the average pooling of scores along the keys; 1 = none.
        every: evict once ``every`` tokens beyond the budget have accumulated; 1 = as soon as over budget
            (a write of more than ``every`` tokens evicts down to the budget first). Larger values amortise
            the scoring and compaction over ``every`` decoding steps: the steps between score nothing.
        prefill_chunk: if set, ``generate`` runs the prefill in chunks of this many tokens and evicts
            before each, so each layer holds at most ``budget + max(every, prefill_chunk)`` tokens.
        base: the token policy under ``kvcrush`` and ``think``; one of KV_BASE_POLICIES.
        representatives: ``kvcrush`` only: fraction in (0, 1] of the budget (beyond sinks and recent)
            filled with representatives of otherwise evicted tokens.
        channels: ``think`` only: fraction in (0, 1] of each key/value head's key channels stored.
    """

    policy: str
    budget: int | None = None
    ratio: float | None = None
    sink_tokens: int = 4
    recent: int | None = None
    window: int = 32
    pooling: int = 5
    every: int = 1
    prefill_chunk: int | None = None
    base: str = "snapkv"
    representatives: float = 0.25
    channels: float = 0.5

    kind: ClassVar[str] = "kv"
    name: ClassVar[str] = "kv eviction"
    named_by: ClassVar[str] = "policy"  # the shorthand / "type" name sets this field
    shorthand_fields: ClassVar[tuple[str, ...]] = ("budget", "sink_tokens")

    def __post_init__(self) -> None:
        owner = "KVEviction"
        if self.policy not in KV_POLICIES:
            raise ValueError(f"{owner}: unknown `policy` {self.policy!r}; accepted: {', '.join(KV_POLICIES)}")
        if self.base not in KV_BASE_POLICIES:
            raise ValueError(f"{owner}: unknown `base` {self.base!r}; accepted: {', '.join(KV_BASE_POLICIES)}")
        if self.budget is not None and self.ratio is not None:
            raise ValueError(f"{owner}: give `budget` (tokens) or `ratio` (a fraction), not both")
        if self.budget is None and self.ratio is None and self.policy not in ("think", "streaming"):
            raise ValueError(f"{owner}: policy {self.policy!r} needs `budget` (tokens) or `ratio` (a fraction)")
        if self.budget is not None:
            _check_int(owner, "budget", self.budget, 1)
        if self.ratio is not None:
            _check_fraction(owner, "ratio", self.ratio)
        for field_name, minimum in (("sink_tokens", 0), ("window", 1), ("pooling", 1), ("every", 1)):
            _check_int(owner, field_name, getattr(self, field_name), minimum)
        if self.recent is not None:
            _check_int(owner, "recent", self.recent, 0)
        if self.prefill_chunk is not None:
            _check_int(owner, "prefill_chunk", self.prefill_chunk, 1)
        if self.pooling % 2 == 0:
            raise ValueError(f"{owner}: `pooling` must be an odd kernel size, got {self.pooling}")
        _check_fraction(owner, "representatives", self.representatives)
        _check_fraction(owner, "channels", self.channels)
        if self.budget is not None and self.budget < self.protected_tokens:
            raise ValueError(
                f"{owner}: `budget` ({self.budget}) must be at least sink_tokens + recent "
                f"({self.sink_tokens} + {self.kept_recent} = {self.protected_tokens})"
            )

    @property
    def kept_recent(self) -> int:
        """The recent tokens always kept: ``recent``, or its default when unset."""
        if self.recent is not None:
            return self.recent
        return 0 if self.policy == "streaming" else self.window

    @property
    def protected_tokens(self) -> int:
        """Tokens no policy evicts (sinks + recent): the smallest possible budget."""
        return self.sink_tokens + self.kept_recent


def kv_for_attention(kv: KVEviction, attention: Any) -> KVEviction:
    """``kv`` checked against the attention feature it runs beside, with its budget filled in where that sets it.

    - ``streaming`` with neither ``budget`` nor ``ratio`` mirrors a ``SinkAttention``: sink_tokens = the larger
      of the two features', budget = sink_tokens + window - 1, so the cache keeps the sinks and the window's
      window - 1 latest tokens (with the new token, exactly the keys a query sees). Without a SinkAttention it
      is a ValueError.
    - A SinkAttention that moves its sinks (``positions="cache"``, ``distance_limit``) needs them kept at their
      positions: ``sink_tokens`` >= the attention's. ``positions="cache"`` also needs the whole window kept, so
      that its distances stay true: policy ``streaming`` with ``budget`` >= sink_tokens + window - 1.
    """
    sink = attention if isinstance(attention, SinkAttention) else None
    if kv.policy == "streaming" and kv.budget is None and kv.ratio is None:
        if sink is None:
            raise ValueError(
                "KVEviction: policy 'streaming' needs `budget` (tokens) or `ratio` (a fraction), or a sink attention "
                "to take them from (attention='sink:WINDOW,SINK_TOKENS')"
            )
        sink_tokens = max(kv.sink_tokens, sink.sink_tokens)
        kv = dataclasses.replace(kv, sink_tokens=sink_tokens, budget=max(1, sink_tokens + sink.window - 1))
    if sink is None or not (sink.positions == "cache" or sink.distance_limit is not None) or not sink.sink_tokens:
        return kv
    owner = f"KVEviction(policy={kv.policy!r}) beside SinkAttention(positions={sink.positions!r})"
    if kv.sink_tokens < sink.sink_tokens:
        raise ValueError(
            f"{owner}: `sink_tokens` ({kv.sink_tokens}) must be at least the attention's ({sink.sink_tokens}), so "
            "the cache keeps the sinks it moves"
        )
    if sink.positions == "cache":
        needed = kv.sink_tokens + sink.window - 1
        if kv.policy != "streaming" or kv.budget is None or kv.budget < needed:
            raise ValueError(
                f"{owner}: positions='cache' needs the whole window kept: policy 'streaming' with `budget` >= "
                f"sink_tokens + window - 1 = {needed} (or no budget, to take it from the attention); got "
                f"budget={kv.budget}, ratio={kv.ratio}"
            )
    return kv


# RoPE scaling types by shorthand name: (required fields, optional fields). The required fields are also the
# positional values of the shorthand ("ntk:4" sets `factor`, "self_extend:512,16" sets `window` and `group`).
ROPE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow")),
    "longrope": (("short_factor", "long_factor"), ("factor", "original_max_position_embeddings", "attention_factor")),
    "llama3": (("factor",), ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")),
    "ntk": (("factor",), ()),
    "abf": (("base",), ()),
    "dynamic_yarn": (("factor",), ("original_max_position_embeddings", "beta_fast", "beta_slow")),
    "giraffe_power": (("power",), ()),
    "giraffe_truncate": (("factor",), ("original_max_position_embeddings",)),
    "ntk_by_parts": (("factor",), ("original_max_position_embeddings", "beta_fast", "beta_slow")),
    "self_extend": (("window", "group"), ()),
    "dual_chunk": (("chunk_size", "local_size"), ()),
}
# Types carried out on the attention path (``longctx_rope_remap``): the rotary embedding stays as it is.
ROPE_REMAP_TYPES = ("self_extend", "dual_chunk")


def _check_number(owner: str, name: str, value: Any, above: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > above:
        raise ValueError(f"{owner}: `{name}` must be a number > {above:g}, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling or position scheme: which positions/frequencies a model uses past its trained length.

    ``type`` picks the method (``"ntk:4"`` is ``RopeScaling(type="ntk", factor=4)``); each type takes only
    the fields listed for it in ``ROPE_TYPES`` and leaves the others None. Lengths are in tokens.

    Types (``L`` = ``original_max_position_embeddings``, the trained length; ``d`` = rotary dimension):
        ``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``: transformers' own rope types.
        ``ntk``: static NTK-aware scaling, base' = base * factor ** (d / (d - 2)).
        ``abf``: adjusted base frequency, base' = ``base``.
        ``dynamic_yarn``: YaRN with the factor recomputed from the current length l:
            min(``factor``, max(1, l / L)).
        ``giraffe_power``: Giraffe power scaling, theta_i' = theta_i * (1 - 2i / d) ** ``power``.
        ``giraffe_truncate``: Giraffe truncated basis: theta_i is kept where its wavelength fits in L, set to
            2 pi / (factor L) where it fits in factor * L, and to 0 beyond.
        ``ntk_by_parts``: YaRN's per-frequency interpolation without its attention temperature.
        ``self_extend``: Self-Extend: keys within ``window`` tokens of the query keep their positions, farther
            keys use grouped positions (floor(p / ``group``)), shifted so both parts join at ``window``.
        ``dual_chunk``: dual-chunk attention: positions restart every ``chunk_size - local_size`` tokens;
            keys in the query's chunk (or within ``local_size`` tokens of it in the previous one) keep their
            true distances, the query is placed at ``chunk_size - 1`` for all others.
        ``default``: no scaling; only useful with ``fp32=True``.

    Attributes:
        factor: extension factor; > 1.
        original_max_position_embeddings: trained length L; default: the model's ``max_position_embeddings``.
        attention_factor: yarn/longrope attention temperature; > 0; default: the method's own.
        beta_fast, beta_slow: YaRN ramp bounds (rotations over L); > 0, beta_fast > beta_slow; default 32, 1.
        low_freq_factor, high_freq_factor: llama3 band edges; > 0, high > low; default 1, 4.
        short_factor, long_factor: longrope per-frequency factors (d / 2 numbers each, > 0).
        base: abf's new rope base; > 1.
        power: giraffe_power's exponent k; > 0.
        window, group: self_extend's neighbour window (>= 1) and group size (>= 1).
        chunk_size, local_size: dual_chunk's largest position + 1 (>= 2, at most L for the scheme to stay in
            the trained range) and local window (0 <= local_size < chunk_size).
        fp32: rotate queries and keys in float32 even when the model runs in bf16/fp16 (the model's cos/sin
            are otherwise rounded to the activation dtype). For the supported families.
    """

    type: str
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    base: float | None = None
    power: float | None = None
    window: int | None = None
    group: int | None = None
    chunk_size: int | None = None
    local_size: int | None = None
    fp32: bool = False

    kind: ClassVar[str] = "rope"
    name: ClassVar[str] = "rope scaling"
    named_by: ClassVar[str] = "type"
    shorthand_fields: ClassVar[dict[str, tuple[str, ...]]] = {name: spec[0] for name, spec in ROPE_TYPES.items()}

    def __post_init__(self) -> None:
        owner = f"RopeScaling(type={self.type!r})"
        if self.type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling: unknown `type` {self.type!r}; accepted: {', '.join(ROPE_TYPES)}")
        required, optional = ROPE_TYPES[self.type]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in required and value is None:
                raise ValueError(f"{owner}: needs `{field.name}`")
            if field.name not in (*required, *optional, "type", "fp32") and value is not None:
                accepted = ", ".join((*required, *optional, "fp32"))
                raise ValueError(f"{owner}: does not take `{field.name}`; accepted: {accepted}")
        if not isinstance(self.fp32, bool):
            raise ValueError(f"{owner}: `fp32` must be true or false, got {self.fp32!r}")
        if self.type == "default" and not self.fp32:
            raise ValueError(f"{owner}: changes nothing unless `fp32` is true")
        for name, above in (("factor", 1), ("attention_factor", 0), ("beta_fast", 0), ("beta_slow", 0),
                            ("low_freq_factor", 0), ("high_freq_factor", 0), ("base", 1), ("power", 0)):
            if getattr(self, name) is not None:
                _check_number(owner, name, getattr(self, name), above)
        for name, minimum in (("original_max_position_embeddings", 1), ("window", 1), ("group", 1),
                              ("chunk_size", 2), ("local_size", 0)):
            if getattr(self, name) is not None:
                _check_int(owner, name, getattr(self, name), minimum)
        if (self.beta_fast or 32) <= (self.beta_slow or 1):
            raise ValueError(f"{owner}: `beta_fast` must exceed `beta_slow` (defaults 32 and 1)")
        if (self.high_freq_factor or 4) <= (self.low_freq_factor or 1):
            raise ValueError(f"{owner}: `high_freq_factor` must exceed `low_freq_factor` (defaults 4 and 1)")
        if self.local_size is not None and self.local_size >= self.chunk_size:
            raise ValueError(f"{owner}: `local_size` ({self.local_size}) must be < `chunk_size` ({self.chunk_size})")
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is None:
                continue
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not values:
                raise ValueError(f"{owner}: `{name}` must be a non-empty list of numbers > 0, got {values!r}")
            for value in values:
                _check_number(owner, name, value, 0)
            object.__setattr__(self, name, tuple(values))  # hashable, and equal after a JSON round trip
        if self.short_factor is not None and len(self.short_factor) != len(self.long_factor):
            raise ValueError(f"{owner}: `short_factor` and `long_factor` must have the same length")

    @property
    def on_attention_path(self) -> bool:
        """True for the position schemes carried out by the ``longctx_rope_remap`` attention."""
        return self.type in ROPE_REMAP_TYPES


SPECULATIVE_MODES = ("self", "draft")


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding (``hf_longctx.speculative``): a draft proposes tokens, the target verifies them all
    in one forward; the output has the target's distribution (greedy: the same tokens as plain ``generate``).

    Shorthands: ``"draft:org/draft-model"`` (positional values: draft, num_draft_tokens); ``"self:4"`` is
    self-speculation: the target drafts through a sink + window view of its own ``LongCtxCache``.

    Attributes:
        draft: ``"self"``, a ``PreTrainedModel`` with the target's vocabulary, or its name or path. In config.json a
            model is recorded by its ``name_or_path`` (None for a model built in memory; loading such a config
            raises: give the model again with ``lc.patch(model, speculative=Speculative(draft=model))``).
        draft_kv: the eviction bounding the draft's own cache (a ``KVEviction``, dict or shorthand such as
            ``"streaming:1024"``), or None to keep the draft's whole cache. With ``draft="self"``: the view the
            target drafts through, a ``streaming`` eviction with a budget (its ``sink_tokens`` first stored
            tokens and the most recent ones up to ``budget``); None: ``"streaming:1024"``.
        num_draft_tokens: tokens drafted per round, >= 1, or ``"adaptive"``: up to ``max_draft_tokens``, stopping
            early once the draft's probability of its own token falls under ``threshold``, and switching
            speculation off for the rest of the call when its measured tokens per second fall short of a few
            measured plain steps' (``hf_longctx.speculative.gain``). In graph-captured rounds (``cuda_graphs``)
            a round cannot stop early: each round's length is instead the one that maximises the tokens per second
            modelled from the call's measured acceptance rate and round times, 0 (plain steps) included
            (``gain.DraftLength``).
        max_draft_tokens: the most tokens an adaptive round drafts; >= 1.
        threshold: ``"adaptive"`` in eager rounds: the draft confidence, in (0, 1), under which a round stops
            drafting.
        cuda_graphs: ``draft="self"`` only, over a ``LongCtxCache`` without eviction: whole rounds (draft steps,
            verification, acceptance, rollback) run on static buffers and are replayed as CUDA graphs
            (``hf_longctx.speculative.rounds``); on CPU the same rounds run eagerly. Calls the rounds cannot take
            (logits processors that read the ids, stopping criteria other than max length and EOS, a streamer,
            layers that are not full attention) run eager rounds with graph-replayed draft steps, and a warning
            says why.
    """

    draft: Any = "self"
    draft_kv: Any = None
    num_draft_tokens: int | str = 4
    max_draft_tokens: int = 16
    threshold: float = 0.4
    cuda_graphs: bool = False

    kind: ClassVar[str] = "speculative"
    omitted_at_default: ClassVar[tuple[str, ...]] = ("cuda_graphs",)
    shorthand_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "self": ("num_draft_tokens",),
        "draft": ("draft", "num_draft_tokens"),
    }

    def __post_init__(self) -> None:
        owner = "Speculative"
        if self.draft is None:
            raise ValueError(
                f"{owner}: `draft` is None: the config was saved with a draft model built in memory (it has no "
                "name_or_path); give the model again: lc.patch(model, speculative=lc.Speculative(draft=draft_model))"
            )
        if self.draft != "self" and not isinstance(self.draft, str) and not hasattr(self.draft, "generate"):
            raise ValueError(f"{owner}: `draft` must be 'self', a causal LM or its name/path, got {self.draft!r}")
        object.__setattr__(self, "draft_kv", parse_feature("kv", self.draft_kv))
        if self.num_draft_tokens != "adaptive":
            _check_int(owner, "num_draft_tokens", self.num_draft_tokens, 1)
        _check_int(owner, "max_draft_tokens", self.max_draft_tokens, 1)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0 < self.threshold < 1
        ):
            raise ValueError(f"{owner}: `threshold` must be a number in (0, 1), got {self.threshold!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"{owner}: `cuda_graphs` must be True or False, got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.draft != "self":
            raise ValueError(f"{owner}: `cuda_graphs` is supported with draft='self' only (a draft model's steps "
                             "run eagerly)")
        view = self.draft_kv
        if self.draft == "self" and view is not None and (
            view.policy != "streaming" or view.budget is None or view.budget <= view.sink_tokens
        ):
            raise ValueError(
                f"{owner}: with draft='self', `draft_kv` is the view the target drafts through: a 'streaming' "
                f"eviction with a budget above its sink_tokens (e.g. 'streaming:1024'), got {view!r}"
            )

    @property
    def self_view(self) -> KVEviction:
        """Self-speculation's view: ``draft_kv``, or ``streaming:1024`` when unset."""
        return self.draft_kv if self.draft_kv is not None else KVEviction(policy="streaming", budget=1024)

    @property
    def name(self) -> str:
        """The shorthand / ``"type"`` name: ``"self"`` or ``"draft"``."""
        return "self" if self.draft == "self" else "draft"

    def config_fields(self) -> dict[str, Any]:
        """The fields as config.json stores them: a draft model by its ``name_or_path`` (None if it has none)."""
        draft = self.draft
        if not isinstance(draft, str):
            draft = getattr(draft, "name_or_path", None) or None
        fields = {"draft": draft, "draft_kv": None if self.draft_kv is None else feature_to_dict(self.draft_kv)}
        fields.update(num_draft_tokens=self.num_draft_tokens, max_draft_tokens=self.max_draft_tokens)
        return {**fields, "threshold": self.threshold, "cuda_graphs": self.cuda_graphs}


S2_TYPES = ("s2", "s2_sink")


@dataclass(frozen=True)
class ShiftedSparseAttention:
    """Training-time shifted sparse attention (``hf_longctx.attention.s2``); the shorthand name is the type.

    While the attention module trains, each sequence is cut into groups of ``group_size`` tokens and a query sees
    the keys of its own group only (causally); half of the heads use groups shifted by half a group, so
    information flows between neighbouring groups (LongLoRA's S2-Attn). ``"s2_sink"`` also lets every query see
    the first ``sink_tokens`` tokens of the sequence (SinkLoRA). In eval mode the layer runs sink attention
    (``SinkAttention(sink_tokens, window)``), or dense causal attention without a ``window``.

    Attributes:
        type: ``"s2"`` or ``"s2_sink"``.
        group_size: tokens per group, even, >= 2; None: a quarter of each batch's length. The training length
            must be a multiple of it (ValueError otherwise; pad batches with ``pad_to_multiple_of``).
        sink_tokens: global tokens every query sees: 0 for ``"s2"``, >= 1 for ``"s2_sink"`` (default 4).
        window: the inference window in tokens (>= 1), or None for dense causal attention at inference.
    """

    type: str = "s2"
    group_size: int | None = None
    sink_tokens: int | None = None
    window: int | None = None

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "shifted sparse attention"
    named_by: ClassVar[str] = "type"
    shorthand_fields: ClassVar[dict[str, tuple[str, ...]]] = {"s2": ("group_size",),
                                                              "s2_sink": ("group_size", "sink_tokens")}

    def __post_init__(self) -> None:
        owner = f"ShiftedSparseAttention(type={self.type!r})"
        if self.type not in S2_TYPES:
            raise ValueError(f"ShiftedSparseAttention: unknown `type` {self.type!r}; accepted: {', '.join(S2_TYPES)}")
        if self.group_size is not None:
            _check_int(owner, "group_size", self.group_size, 2)
            if self.group_size % 2:
                raise ValueError(f"{owner}: `group_size` must be even (half the heads shift by half a group), "
                                 f"got {self.group_size}")
        if self.sink_tokens is None:
            object.__setattr__(self, "sink_tokens", 4 if self.type == "s2_sink" else 0)
        if self.type == "s2":
            if self.sink_tokens != 0:
                raise ValueError(f"{owner}: `sink_tokens` is for type 's2_sink'; got {self.sink_tokens!r}")
        else:
            _check_int(owner, "sink_tokens", self.sink_tokens, 1)
        if self.window is not None:
            _check_int(owner, "window", self.window, 1)

    def inference_attention(self, kv_len: int) -> SinkAttention:
        """The attention the layers run outside training, for ``kv_len`` keys (dense: a window over all of them)."""
        return SinkAttention(sink_tokens=self.sink_tokens, window=self.window or max(kv_len, 1))


@dataclass(frozen=True)
class SoftplusAttention:
    """Softplus attention (``hf_longctx.attention.softplus``): LSSA, or LSSAR with re-weighting.

    Logits are ``log(D) * log(N_i) * cos(q_i, k_j)`` (q and k normalised per head, the model's 1/sqrt(D) scaling
    ignored), weights ``softplus(logit) / sum``; LSSAR re-weights them by ``relu(N_i * A_ij - 1) ** power``
    and renormalises. A model trained with softmax needs training into it (fine-tuning or from scratch).

    Attributes:
        reweight: LSSAR (True, the paper's best) or plain LSSA (False).
        power: the re-weighting exponent p, an integer in [1, 64] (default 15, as in the paper).
    """

    reweight: bool = True
    power: int = 15

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "softplus"
    shorthand_fields: ClassVar[tuple[str, ...]] = ("power",)

    def __post_init__(self) -> None:
        owner = "SoftplusAttention"
        if not isinstance(self.reweight, bool):
            raise ValueError(f"{owner}: `reweight` must be true or false, got {self.reweight!r}")
        _check_int(owner, "power", self.power, 1)
        if self.power > 64:
            raise ValueError(f"{owner}: `power` must be an integer in [1, 64], got {self.power!r}")


SPARSE_PATTERNS = ("auto", "vertical_slash", "block_topk")
SPARSE_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class SparseAttention:
    """Dynamic block-sparse prefill (``hf_longctx.sparse``): each head attends to the key blocks / columns its
    pattern estimates for the prompt at hand; dense causal attention below ``min_seq_len`` and for decode.

    Attributes:
        pattern: ``"block_topk"`` (pooled query/key blocks pick key blocks per query block),
            ``"vertical_slash"`` (the last ``last_q`` queries pick key columns and diagonals), or ``"auto"``:
            each head's pattern from ``head_patterns`` (written by ``lc.sparse.calibrate``; block_topk for
            every head until calibrated, with a warning).
        density: fraction in (0, 1] of each query block's causal key blocks (block_topk), or of the keys an
            average query sees (vertical_slash); None: select by ``mass``.
        mass: with ``density`` None, the attention mass in (0, 1] the selection keeps.
        min_seq_len: prompts shorter than this many tokens run dense; >= 1.
        last_q: queries the vertical-slash estimate reads; >= 1.
        block_size: tokens per query/key block; one of 16, 32, 64, 128.
        head_patterns: per layer (index = ``layer_idx``) a list with one pattern name per query head, or None.
    """

    pattern: str = "auto"
    density: float | None = None
    mass: float = 0.95
    min_seq_len: int = 8192
    last_q: int = 64
    block_size: int = 128
    head_patterns: Any = None

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "sparse"
    shorthand_fields: ClassVar[tuple[str, ...]] = ("pattern", "density")
    omitted_at_default: ClassVar[tuple[str, ...]] = ("block_size", "head_patterns")

    def __post_init__(self) -> None:
        owner = "SparseAttention"
        if self.pattern not in SPARSE_PATTERNS:
            raise ValueError(f"{owner}: unknown `pattern` {self.pattern!r}; accepted: {', '.join(SPARSE_PATTERNS)}")
        if self.density is not None:
            _check_fraction(owner, "density", self.density)
        _check_fraction(owner, "mass", self.mass)
        _check_int(owner, "min_seq_len", self.min_seq_len, 1)
        _check_int(owner, "last_q", self.last_q, 1)
        if self.block_size not in SPARSE_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ValueError(f"{owner}: `block_size` must be one of {SPARSE_BLOCK_SIZES}, got {self.block_size!r}")
        if self.head_patterns is not None:
            named = [p for p in SPARSE_PATTERNS if p != "auto"]
            if isinstance(self.head_patterns, (str, bytes)) or not all(
                isinstance(layer, (list, tuple)) and all(p in named for p in layer) for layer in self.head_patterns
            ):
                raise ValueError(f"{owner}: `head_patterns` must be a list (per layer) of lists of "
                                 f"{', '.join(named)} (one per head), got {self.head_patterns!r}")
            object.__setattr__(self, "head_patterns", tuple(tuple(layer) for layer in self.head_patterns))

    def config_fields(self) -> dict[str, Any]:
        """The fields as config.json stores them (``head_patterns`` as plain lists)."""
        fields = dataclasses.asdict(self)
        if self.head_patterns is not None:
            fields["head_patterns"] = [list(layer) for layer in self.head_patterns]
        return fields


# Every implemented feature, by kind and shorthand name. A kind with no entry is planned, not built.
FEATURES: dict[str, dict[str, type]] = {
    "attention": {SinkAttention.name: SinkAttention, **{name: ShiftedSparseAttention for name in S2_TYPES},
                  SoftplusAttention.name: SoftplusAttention, SparseAttention.name: SparseAttention},
    "rope": {name: RopeScaling for name in ROPE_TYPES},
    "kv": {policy: KVEviction for policy in KV_POLICIES},
    "speculative": {mode: Speculative for mode in SPECULATIVE_MODES},
}


def _known(kind: str) -> str:
    names = sorted(FEATURES[kind])
    return ", ".join(repr(n) for n in names) if names else "none yet (planned)"


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _from_fields(kind: str, name: str, cls: type, fields: dict[str, Any]):
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise ValueError(
            f"{kind} {name!r}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    named_by = getattr(cls, "named_by", None)  # a dataclass registered under several names
    if named_by is not None:
        if fields.get(named_by, name) != name:
            raise ValueError(f"{kind} {name!r}: `{named_by}` {fields[named_by]!r} contradicts the name {name!r}")
        fields = {**fields, named_by: name}
        return cls(**fields)
    feature = cls(**fields)
    if feature.name != name:  # a class serving several names tells its name from its fields
        raise ValueError(f"{kind} {name!r}: its fields make it a {feature.name!r} feature")
    return feature


def _lookup(kind: str, name: Any) -> type:
    try:
        return FEATURES[kind][name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; known: {_known(kind)}") from None


def parse_feature(kind: str, value: Any):
    """Normalise one feature (dataclass, dict or shorthand string) to its dataclass, or None."""
    if kind not in FEATURES:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(FEATURE_KINDS)}")
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if getattr(value, "kind", None) != kind:
            raise ValueError(f"`{kind}` got a {type(value).__name__}, which is a {value.kind!r} feature")
        return value
    if isinstance(value, dict):
        fields = dict(value)
        name = fields.pop("type", None)
        return _from_fields(kind, name, _lookup(kind, name), fields)
    if isinstance(value, str):
        name, _, args = value.partition(":")
        name = name.strip()
        cls = _lookup(kind, name)
        fields: dict[str, Any] = {}
        by_name = cls.shorthand_fields  # a tuple, or a dict {name: tuple} for a class serving several names
        positional = list(by_name[name] if isinstance(by_name, dict) else by_name)
        for item in filter(None, (part.strip() for part in args.split(","))):
            if "=" in item:
                field, _, text = item.partition("=")
                fields[field.strip()] = _parse_value(text)
                positional = []
            elif positional:
                fields[positional.pop(0)] = _parse_value(item)
            else:
                raise ValueError(f"{kind} shorthand {value!r}: too many or misplaced positional values")
        return _from_fields(kind, name, cls, fields)
    raise ValueError(f"`{kind}` must be a feature dataclass, a dict or a shorthand string, got {type(value).__name__}")


def feature_to_dict(feature) -> dict[str, Any]:
    """The config.json form of a feature: ``{"type": name, **fields}`` (less its ``omitted_at_default`` fields
    that hold their defaults)."""
    fields = feature.config_fields() if hasattr(feature, "config_fields") else dataclasses.asdict(feature)
    for field in dataclasses.fields(feature):
        if field.name in getattr(feature, "omitted_at_default", ()) and fields[field.name] == field.default:
            del fields[field.name]
    named_by = getattr(feature, "named_by", None)
    return {"type": fields.pop(named_by) if named_by else feature.name, **fields}


@dataclass(frozen=True)
class LongCtxConfig:
    """Which long-context features a model runs with; each field is one feature or None.

    Fields accept the dataclass, a dict or a shorthand string, and are stored as the dataclass.
    """

    attention: Any = None
    rope: Any = None
    kv: Any = None
    speculative: Any = None

    def __post_init__(self) -> None:
        for kind in FEATURE_KINDS:
            object.__setattr__(self, kind, parse_feature(kind, getattr(self, kind)))
        if self.kv is not None:
            object.__setattr__(self, "kv", kv_for_attention(self.kv, self.attention))
        if self.rope is not None and self.rope.on_attention_path and (self.attention or self.kv) is not None:
            raise ValueError(
                f"rope type {self.rope.type!r} runs on its own attention path (longctx_rope_remap) and cannot be "
                "combined with attention= or kv= features"
            )

    def is_empty(self) -> bool:
        return all(getattr(self, kind) is None for kind in FEATURE_KINDS)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict with the features that are set."""
        return {
            kind: feature_to_dict(getattr(self, kind))
            for kind in FEATURE_KINDS
            if getattr(self, kind) is not None
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongCtxConfig:
        unknown = sorted(set(data) - set(FEATURE_KINDS))
        if unknown:
            raise ValueError(f"unknown feature kind(s) {', '.join(unknown)}; known: {', '.join(FEATURE_KINDS)}")
        return cls(**data)

    @classmethod
    def coerce(cls, config: Any = None, **features: Any) -> LongCtxConfig:
        """Build a config from a LongCtxConfig / dict / None plus keyword features (which win)."""
        unknown = sorted(set(features) - set(FEATURE_KINDS))
        if unknown:
            raise ValueError(f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURE_KINDS)}")
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, LongCtxConfig):
            base = {kind: getattr(config, kind) for kind in FEATURE_KINDS}
        elif isinstance(config, dict):
            base = dict(cls.from_dict(config).__dict__)
        else:
            raise ValueError(f"`config` must be a LongCtxConfig, a dict or None, got {type(config).__name__}")
        base.update({kind: value for kind, value in features.items() if value is not None})
        return cls(**base)
