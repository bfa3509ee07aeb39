"""Graph-captured decoding over a ``LongCtxCache``: one-token steps on static buffers, replayed as a CUDA graph.

    cache = lc.LongCtxCache(model, kv="snapkv:4096,every=64", cuda_graphs=True)    # or kv=None
    out = model.generate(ids, past_key_values=cache, custom_generate=lc.graph_generate, max_new_tokens=256)

The model must run the ``longctx_kv`` attention (``lc.patch(model, kv=...)`` sets it; without eviction,
``model.set_attn_implementation("longctx_kv")``): it holds the static path. What makes a step static:

- inputs: ``GraphDecoder`` owns (B, 1) input ids and position ids (and ``cache_position`` where the model takes
  it); each step copies the new tokens into them, so the captured forward reads fixed addresses;
- cache: every layer is a ``LongCtxLayer`` in static decoding (``LongCtxLayer.set_static``): a one-token update
  writes at the slot its device counter names and hands the attention the whole preallocated buffers, which
  ``reserve_static`` sized for the run and which do not move while static;
- attention: ``longctx_kv`` attends only the slots below the device counter (the kernel reads the rows' key spans
  from the device); no host sync, no shape that depends on the stored length. The padding mask is not passed:
  the layers hold their slots' validity.

So one captured step serves every length. A step that is not a plain write (an eviction is due, or the queries
kept for an attention policy's scores must be scored) runs eagerly, between replays, through the same code; so do
the first step after a change of buffer addresses or code path (``LongCtxLayer.static_signature``: an eviction
that starts moving sinks, buffers that grew, a draft view set or not), which warms the kernels up before that
signature's step is captured; the decoder keeps the latest two captured steps (a self-speculation drafter
alternates its view's step and the plain one), so switching back replays without a capture. Logits
processors, sampling and stopping run eagerly on the step's logits, exactly as in ``GenerationMixin._sample``,
so greedy and sampled tokens (same generator) match generate's with the same cache and attention.

On CPU (or with ``cuda_graphs=False``) the same static steps run eagerly: graphs are CUDA-only, and asking for them
on CPU is a documented no-op, as ``torch.compile(mode="reduce-overhead")`` is. A sink attention that moves its
sinks (``positions="cache"``, ``distance_limit``) is captured too: the kernel takes the layer's key spans from the
device (``LongCtxLayer.static_spans``). Rope types that rescale with the length (``dynamic``) sync and cannot be
captured.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

from ..attention.kv import KV_ATTENTION_NAME
from .cache import LongCtxCache
from .layers import LongCtxLayer

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _host_updated_rope(model: PreTrainedModel) -> str | None:
    """The RoPE type of ``model`` whose frequencies transformers updates per step from the sequence length (a
    host-side comparison: any type with "dynamic" in its name, and "longrope"), or None."""
    for module in model.modules():
        types = getattr(module, "rope_type", None)
        for rope_type in (types.values() if isinstance(types, dict) else [types]):
            if isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope"):
                return rope_type
    return None


class GraphDecoder:
    """One-token decoding steps of ``model`` over ``cache``, replayed as CUDA graphs where they can be.

    Args:
        model: a causal LM running the ``longctx_kv`` attention.
        cache: its ``LongCtxCache``, already prefilled; every layer must be a ``LongCtxLayer``
            (``LongCtxCache(..., cuda_graphs=True)`` makes sliding-window layers so).
        graphs: capture and replay on CUDA; False (or a CPU model) runs every step eagerly.
    Raises:
        ValueError: another attention implementation, a cache layer that is not a ``LongCtxLayer``, or (with
            ``graphs``) a RoPE type updated on the host at every step (dynamic types, longrope).
    """

    def __init__(self, model: PreTrainedModel, cache: LongCtxCache, graphs: bool = True):
        implementation = model.config.get_text_config(decoder=True)._attn_implementation
        if implementation != KV_ATTENTION_NAME:
            raise ValueError(
                f"GraphDecoder: the model must run attn_implementation={KV_ATTENTION_NAME!r} (it attends a static "
                f"cache), got {implementation!r}; use lc.patch(model, kv=...) or "
                f"model.set_attn_implementation({KV_ATTENTION_NAME!r})"
            )
        self.layers = [layer for layer in cache.layers if isinstance(layer, LongCtxLayer)]
        if not self.layers or len(self.layers) != len(cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers if not isinstance(layer, LongCtxLayer)})
            raise ValueError(f"GraphDecoder: every cache layer must be a LongCtxLayer, got {kinds}; build the cache "
                             "with LongCtxCache(model, ..., cuda_graphs=True)")
        if graphs:
            host_rope = _host_updated_rope(model)
            if host_rope is not None:
                raise ValueError(
                    f"GraphDecoder: RoPE type {host_rope!r} recomputes its frequencies on the host from each step's "
                    "length (transformers' dynamic / longrope update), which a CUDA graph cannot replay; use a static "
                    "type (linear, ntk, yarn, llama3, ...) or cuda_graphs=False"
                )
        self.model, self.cache = model, cache
        self.device = self.layers[0].device
        self.graphs = graphs and self.device.type == "cuda"
        batch = self.layers[0].keys.shape[0]
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.extra = {}
        if "cache_position" in inspect.signature(model.base_model.forward).parameters:  # transformers 5.17
            self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
            self.extra["cache_position"] = self.cache_position
        self.logits: torch.Tensor | None = None  # (B, V) float32, the latest step's
        # captured steps by signature: at most two (a drafter alternates its view's step and the plain one)
        self.graphs_by_signature: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._warm: tuple | None = None  # the signature the latest eager step warmed up
        self.replays = self.eager_steps = self.captures = 0

    def start(self, steps: int, padding: torch.Tensor | None = None) -> None:
        """Put the layers in static decoding, sized for ``steps`` one-token steps.

        Args:
            padding: (B, S) bool 2D padding mask of the tokens seen (generate's), or None without padding.
        """
        for layer in self.layers:
            layer.set_static(True, padding)
            layer.reserve_static(steps)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens in every layer while static (multi-token eager writes, such as a
        speculative verification pass, count); a short layer grows to at least twice its stored length, so its
        buffers move (and the graph is re-captured) rarely."""
        for layer in self.layers:
            if layer.stored_length + tokens + 1 > layer.capacity:
                layer.reserve_static(max(tokens, layer.stored_length))

    def stop(self) -> None:
        """Leave static decoding (the cache is usable as before) and free the graph."""
        self.graphs_by_signature, self._warm = {}, None
        for layer in self.layers:
            layer.set_static(False)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the (B, V) float32 logits of the next one (a buffer the next step
        overwrites).

        Args:
            tokens: (B,) int64 the new tokens; positions: (B,) int64 their position ids.
        """
        self.input_ids.copy_(tokens[:, None])
        self.position_ids.copy_(positions[:, None])
        if self.extra:
            self.cache_position.fill_(self.cache.get_seq_length())
        if not self.graphs or not all(layer.static_ready() for layer in self.layers):
            self._forward()
            self.eager_steps += 1
            return self.logits
        signature = tuple(layer.static_signature() for layer in self.layers)
        graph = self.graphs_by_signature.get(signature)
        if graph is None and signature != self._warm:  # new addresses or code path: warm up eagerly, capture next
            self._warm = signature
            warm_up(self.device, self._forward)
            self.eager_steps += 1
            return self.logits
        if graph is None:
            graph = capture(self.layers, self._forward)
            self.captures += 1
            if len(self.graphs_by_signature) >= 2:  # the oldest goes (its buffers may have moved)
                self.graphs_by_signature.pop(next(iter(self.graphs_by_signature)))
            self.graphs_by_signature[signature] = graph
        graph.replay()
        for layer in self.layers:
            layer.advance_static()
        self.replays += 1
        return self.logits

    def _forward(self) -> None:
        out = self.model(input_ids=self.input_ids, position_ids=self.position_ids, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, **self.extra)
        if self.logits is None:
            self.logits = torch.empty(out.logits.shape[0], out.logits.shape[-1], dtype=torch.float32,
                                      device=self.device)
        self.logits.copy_(out.logits[:, -1])


def warm_up(device: torch.device, step) -> None:
    """Run ``step()`` eagerly on a side stream (kernels compiled, workspaces allocated) before it is captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)


def capture(layers: list[LongCtxLayer], step, pool=None) -> torch.cuda.CUDAGraph:
    """Record ``step()`` as a CUDA graph (in memory ``pool`` if given). Capture does not run it: the host counters
    of ``layers`` it advanced are put back (each replay then advances them)."""
    counters = [layer.host_counters() for layer in layers]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    for layer, saved in zip(layers, counters):
        layer.restore_counters(saved)
    return graph


def graph_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    graphs: bool = True,
    **model_kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Generate's decoding loop (``custom_generate``; the signature of ``GenerationMixin._sample``) with the
    one-token steps of :class:`GraphDecoder`.

    Args:
        model: the model (generate passes itself); it runs the ``longctx_kv`` attention.
        input_ids: (B, S) int64 prompt, left-padded for B > 1.
        logits_processor, stopping_criteria, generation_config: as generate prepared them (greedy or sampling).
        graphs: replay CUDA graphs (on CUDA); False runs the same static steps eagerly (a baseline). A generate
            keyword: ``model.generate(..., custom_generate=lc.graph_generate, graphs=False)``.
        **model_kwargs: ``past_key_values`` (a ``LongCtxCache(..., cuda_graphs=True)``; an empty other cache, e.g.
            generate's default, is replaced by one, with the eviction of an empty ``LongCtxCache``) and
            ``attention_mask``.
    Returns:
        (B, S + new) int64 sequences, or a ``GenerateDecoderOnlyOutput`` with ``sequences`` and
        ``past_key_values`` when ``return_dict_in_generate``.
    Raises:
        ValueError: unsupported generate options (scores, attentions, hidden states, synced GPUs), or a filled
            cache that is not a ``LongCtxCache``.
    """
    for flag in _UNSUPPORTED_OUTPUTS:
        if getattr(generation_config, flag, False):
            raise ValueError(f"graph_generate: `{flag}` is not supported")
    if synced_gpus:
        raise ValueError("graph_generate: `synced_gpus` is not supported")
    cache = model_kwargs.get("past_key_values")
    if not (isinstance(cache, LongCtxCache) and cache.cuda_graphs):
        if cache is not None and cache.get_seq_length() != 0:
            raise ValueError(f"graph_generate: needs a LongCtxCache(..., cuda_graphs=True), got a filled "
                             f"{type(cache).__name__}")
        kv = cache.kv if isinstance(cache, LongCtxCache) else None  # generate's default on a model patched with kv
        cache = LongCtxCache(model, kv=kv, reserve=generation_config.max_length, cuda_graphs=True)
    mask = model_kwargs.get("attention_mask")
    logits, positions = _prefill(model, cache, input_ids, mask, generation_config.prefill_chunk_size)
    pad = generation_config._pad_token_tensor
    stops_on_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    decoder = GraphDecoder(model, cache, graphs=graphs)
    decoder.start(generation_config.max_length - input_ids.shape[1] - 1, padding=mask)  # the prefill gave one
    try:
        while True:
            scores = logits_processor(input_ids, logits)
            if generation_config.do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            if stops_on_eos:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if unfinished.max() == 0:
                break
            positions = positions + 1
            logits = decoder.step(tokens, positions)
    finally:
        decoder.stop()
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, past_key_values=cache)
    return input_ids


def _prefill(
    model: PreTrainedModel, cache: LongCtxCache, input_ids: torch.Tensor, mask: torch.Tensor | None, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the tokens the cache has not seen (in chunks of ``chunk`` tokens if set).

    Returns:
        ((B, V) float32 logits of the last token, (B,) int64 its position ids).
    """
    seen, length = cache.get_seq_length(), input_ids.shape[1]
    if length <= seen:
        raise ValueError(f"graph_generate: the cache has seen {seen} tokens, the input has {length}: nothing to feed")
    if mask is None:
        positions = torch.arange(length, device=input_ids.device).expand(input_ids.shape[0], -1)
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step = chunk or max(1, length - seen)
    for start in range(seen, length, step):
        stop = min(start + step, length)
        out = model(input_ids=input_ids[:, start:stop], attention_mask=None if mask is None else mask[:, :stop],
                    position_ids=positions[:, start:stop], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), positions[:, -1]
