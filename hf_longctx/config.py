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


@dataclass(frozen=True)
class SinkAttention:
    """Causal attention over the first ``sink_tokens`` tokens plus the most recent ``window`` tokens.

    Attributes:
        sink_tokens: initial tokens every query attends to ("attention sinks"); >= 0.
        window: recent tokens a query attends to, itself included; >= 1. A window at least as
            long as the sequence is exact (dense) causal attention.

    Layers that already have a sliding window of their own (Gemma 2's local layers, Mistral with
    ``sliding_window`` set) keep it unchanged; the feature applies to full-attention layers.
    """

    sink_tokens: int = 4
    window: int = 4096

    kind: ClassVar[str] = "attention"
    name: ClassVar[str] = "sink"
    shorthand_fields: ClassVar[tuple[str, ...]] = ("window", "sink_tokens")

    def __post_init__(self) -> None:
        _check_int("SinkAttention", "sink_tokens", self.sink_tokens, 0)
        _check_int("SinkAttention", "window", self.window, 1)


# Every implemented feature, by kind and shorthand name. A kind with no entry is planned, not built.
FEATURES: dict[str, dict[str, type]] = {
    "attention": {SinkAttention.name: SinkAttention},
    "rope": {},
    "kv": {},
    "speculative": {},
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


def _from_fields(kind: str, cls: type, fields: dict[str, Any]):
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise ValueError(
            f"{kind} {cls.name!r}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(**fields)


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
        cls = _lookup(kind, fields.pop("type", None))
        return _from_fields(kind, cls, fields)
    if isinstance(value, str):
        name, _, args = value.partition(":")
        cls = _lookup(kind, name.strip())
        fields: dict[str, Any] = {}
        positional = list(cls.shorthand_fields)
        for item in filter(None, (part.strip() for part in args.split(","))):
            if "=" in item:
                field, _, text = item.partition("=")
                fields[field.strip()] = _parse_value(text)
                positional = []
            elif positional:
                fields[positional.pop(0)] = _parse_value(item)
            else:
                raise ValueError(f"{kind} shorthand {value!r}: too many or misplaced positional values")
        return _from_fields(kind, cls, fields)
    raise ValueError(f"`{kind}` must be a feature dataclass, a dict or a shorthand string, got {type(value).__name__}")


def feature_to_dict(feature) -> dict[str, Any]:
    """The config.json form of a feature: ``{"type": name, **fields}``."""
    return {"type": feature.name, **dataclasses.asdict(feature)}


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
