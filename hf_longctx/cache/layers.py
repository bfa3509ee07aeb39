"""``LongCtxLayer``: one full-attention layer's KV cache, in preallocated buffers, with eviction.

Storage (B batch, H_kv key/value heads, C capacity in tokens, D head size):
- ``keys`` (B, H_kv, C, D_k) and ``values`` (B, H_kv, C, D_v) buffers; the first ``stored_length``
  slots hold tokens. New tokens are written in place (no per-step ``torch.cat``). A layer that keeps
  every token grows its buffers geometrically (x2) or has a fixed capacity. An evicting layer never holds
  more than ``budget + max(every, prefill_chunk, the largest write)`` tokens (see "When eviction happens"),
  or what it held while recording: its buffers grow (x2) up to that bound only, and an eviction shrinks
  larger ones (an unchunked prefill's) to it, so their memory is freed.
- ``valid`` (B, C) bool: which slots hold real tokens rather than padding.
- ``scores`` (B, H_kv, C) float32: the eviction policy's importance of each slot.
- ``key_channels`` (B, H_kv, D_k) int64 or None: with ThinK, the key channels stored (D_k is then
  smaller than the model's head size); the keys handed to attention have zeros elsewhere.
- ``evicted`` (B,) int64: real tokens of each row no longer stored. Keys stay rotated at their true
  positions; a sink/window attention that moves its sinks reads this (``position_offset``) to know them.

Lengths: ``get_seq_length()`` is the number of tokens SEEN (logical, what generate's slicing and
crop arithmetic rely on); ``stored_length`` is what the buffers hold. They differ once tokens are
evicted, as in ``DynamicSlidingWindowLayer``.

Slot order: within a row, real tokens are stored in the order they came; after an eviction a row is
``[its kept padding..., its kept real tokens]``, and it keeps padding only when it has fewer real
tokens than the budget, so the number of stored slots is the same for every row and a pad never takes
the place of a real token. New tokens are appended after the kept ones, so a chunk of queries is
causal over the stored order. With left padding, the stored validity then equals the last
``stored_length`` columns of generate's 2D mask.

When eviction happens: at the start of ``update`` (before the new tokens are written), when more
than ``budget`` tokens are stored and writing the new ones would take the layer past ``budget + every``
tokens: one-token steps evict once ``every`` tokens beyond the budget have accumulated, and a write of
more than ``every`` tokens (a prefill chunk) evicts whatever exceeds the budget first. So at most
``budget + max(every, write)`` tokens are ever stored. ``get_mask_sizes`` announces the length after
that eviction. After ``activate_past_recording()`` (speculative decoding) eviction is deferred to
``crop``, so rejected tokens can be removed first.

When scores are computed: the attention function reports every forward (``observe``). A forward of
several tokens is scored at once. The queries of one-token decoding steps are only kept (a reference,
no computation) and scored together just before an eviction (or once ``_PENDING_STEPS`` have gathered,
a mark of holes, a crop or a batch change), so a decoding step that does not evict costs what a step
without a policy costs: no scoring, no host sync, no work proportional to the cache.

Static decoding (``set_static``, used by ``hf_longctx.cache.graphs`` to replay one-token steps as CUDA graphs):
a one-token ``update`` writes at the slot a DEVICE counter names (``static_length``, (1,) int64, mirrored by
``stored_length`` on the host), returns the whole (B, H_kv, capacity, D) buffers, and keeps the step's query
for the policy in a fixed buffer; the ``longctx_kv`` attention then reads only the slots below the device
counter. Nothing in such a step depends on the stored length on the host, so one captured step serves every
length. The buffers never move while static (no growth or shrinking: ``reserve_static`` sizes them first);
evictions, prefills and crops run eagerly between steps and set the device counter.

Static blocks (speculative verification, ``hf_longctx.speculative.rounds``): after ``begin_block(k)`` the next
update writes its k tokens at the k slots from the device counter and the attention reads them as queries at those
slots (``block_kv_valid``, the kernel's ``q_start``); ``accept_block`` then keeps each row's accepted prefix of the
block (the other slots become holes) and moves the counter past the block. Draft steps before it are undone by
``rewind_static`` (the counter moves back on the device). None of it reads a length on the host.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attention.kv import KV_ATTENTION_NAME, announce
from ..config import SinkAttention
from .policies import EvictionPolicy

_BLOCK = 128  # capacities grown geometrically are multiples of this many tokens
_PENDING_STEPS = 64  # decoding queries kept unscored at most (their memory: this many tokens' queries)


def _round_up(tokens: int) -> int:
    return -(-tokens // _BLOCK) * _BLOCK


class LongCtxLayer(CacheLayerMixin):
    """A full-attention cache layer over preallocated buffers, with an optional eviction policy.

    Args:
        policy: the eviction policy of this layer, or None to keep every token.
        capacity: fixed capacity in tokens (preallocated at the first update; exceeding it raises),
            or None to grow geometrically.
        reserve: tokens to allocate at the first update when ``capacity`` is None (e.g. generate's
            prompt + new tokens), so a run without eviction allocates once; None: the first update's.
        layer_idx: the model layer this cache layer serves (for messages).
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self,
        policy: EvictionPolicy | None = None,
        capacity: int | None = None,
        reserve: int | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.policy = policy
        self.fixed_capacity = capacity
        self.reserve = reserve
        self.layer_idx = layer_idx
        self.valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.key_channels: torch.Tensor | None = None
        self.evicted: torch.Tensor | None = None
        self._chosen_channels: torch.Tensor | None = None  # ThinK's choice, applied at the next update
        self.stored_length = 0
        self.cumulative_length = 0  # tokens seen
        self.prompt_length = 0  # tokens seen by the end of the latest prefill (for ratio budgets)
        self.record_past = False
        self.padded = False  # whether a stored slot may hold padding (a padding mask was reported)
        self.has_holes = False  # whether real slots may follow a non-real one (``mark_holes``)
        self._since_eviction = 0  # the last tokens stored in order: what `crop` can remove
        self._awaiting_report = False
        self._pending: list[torch.Tensor] = []  # (B, H, 1, D) queries of the latest decoding steps, unscored
        self._scaling: tuple[float | None, float | None] = (None, None)  # the reported scale and softcap
        self._recorded_peak = 0  # the most tokens stored while recording (speculative rounds need it again)
        self.view: SinkAttention | None = None  # the draft view while self-speculation drafts
        self.static = False  # static decoding (see the module docstring)
        self.static_step = False  # whether the latest update was a static one-token write
        self.static_length: torch.Tensor | None = None  # (1,) int64 device mirror of stored_length
        self._static_pending: torch.Tensor | None = None  # (B, H, _PENDING_STEPS, D) decoding queries, unscored
        self._static_slot: torch.Tensor | None = None  # (1,) int64 device index of the next pending query
        self._static_count = 0  # pending queries in `_static_pending` (host mirror of `_static_slot`)
        self.block = 0  # tokens of the static block the next update writes (0: none; ``begin_block``)
        # what the attention computes once per forward for every layer holding the same slots (a LongCtxCache
        # gives its layers one dict; its first layer clears it at each update, the start of a forward)
        self.shared: dict | None = None
        self.clears_shared = False

    # ----------------------------------------------------------------------------------- sizes
    @property
    def capacity(self) -> int:
        """Tokens the buffers can hold."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens seen (logical length), not the number stored."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        """No maximum: eviction or growth make room for any number of tokens."""
        return -1

    @property
    def position_offset(self) -> torch.Tensor | None:
        """(B,) int64 real tokens each row evicted, or None while no token was evicted: a stored token after
        the evicted ones is at true position (its index among the stored real tokens) + this."""
        return self.evicted if self.cumulative_length > self.stored_length else None

    def eviction_target(self, incoming: int = 1, at_crop: bool = False) -> int | None:
        """The stored length the eviction before writing ``incoming`` tokens reduces to, if one is due, else None.

        Args:
            incoming: tokens the next update writes.
            at_crop: True when asked from ``crop``: a deferred eviction may run even while recording.
        """
        if self.policy is None or (self.record_past and not at_crop):
            return None
        budget = self.policy.budget(self.prompt_length)
        stored = self.stored_length
        if budget is None or stored <= budget or stored + incoming <= budget + self.policy.feature.every:
            return None
        return budget

    def _bound(self, incoming: int) -> int | None:
        """Tokens an evicting layer may have to hold around a write of ``incoming`` tokens, or None if it does
        not evict: ``budget + max(every, prefill_chunk, incoming)``, or its peak while recording if larger."""
        budget = None if self.policy is None else self.policy.budget(self.prompt_length)
        if budget is None:
            return None
        feature = self.policy.feature
        return max(budget + max(feature.every, feature.prefill_chunk or 1, incoming), self._recorded_peak)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next forward: stored after any due eviction, plus the queries.

        The offset is the number of tokens seen but no longer stored, so a stock mask built over
        ``kv_offset .. kv_offset + kv_length`` reads the last ``kv_length`` columns of the 2D mask.
        """
        target = self.eviction_target(query_length)
        kept = self.stored_length if target is None else target
        return kept + query_length, self.cumulative_length - kept

    # ----------------------------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self._shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1], value_states.shape[-1])
        self._allocate(self.fixed_capacity or 0)
        self.evicted = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the buffers to ``capacity`` tokens, keeping the stored slots."""
        batch, kv_heads, key_dim, value_dim = self._shape
        stored = self.stored_length
        keys = torch.empty(batch, kv_heads, capacity, key_dim, dtype=self.dtype, device=self.device)
        values = torch.empty(batch, kv_heads, capacity, value_dim, dtype=self.dtype, device=self.device)
        valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        scores = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=self.device)
        if stored:
            keys[:, :, :stored] = self.keys[:, :, :stored]
            values[:, :, :stored] = self.values[:, :, :stored]
            valid[:, :stored] = self.valid[:, :stored]
            scores[:, :, :stored] = self.scores[:, :, :stored]
        self.keys, self.values, self.valid, self.scores = keys, values, valid, scores

    def _make_room(self, needed: int, incoming: int) -> None:
        """Grow the buffers to hold ``needed`` tokens (the last ``incoming`` of them being written)."""
        if needed <= self.capacity:
            return
        if self.static:
            raise RuntimeError(
                f"LongCtxCache: layer {self.layer_idx} is in static decoding and full ({self.capacity} slots); "
                "reserve_static() must size it for the steps first"
            )
        if self.fixed_capacity is not None:
            raise ValueError(
                f"LongCtxCache: `capacity` ({self.fixed_capacity} tokens) is too small for the {needed} tokens "
                f"layer {self.layer_idx} must store; raise it, evict (kv=...), or chunk the prefill "
                "(KVEviction.prefill_chunk)"
            )
        first = self.capacity == 0 and self.reserve is not None
        capacity = _round_up(max(needed, self.reserve if first else 2 * self.capacity))
        bound = self._bound(incoming)
        self._allocate(capacity if bound is None else min(capacity, max(needed, bound)))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict if due, write the new tokens in place, return the stored keys and values.

        Args:
            key_states: (B, H_kv, Sq, D_k) post-RoPE keys of the new tokens; value_states likewise.
        Returns:
            (keys, values): (B, H_kv, stored_length, D) views of the buffers, the new tokens last.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.clears_shared:
            self.shared.clear()
        if self._awaiting_report:
            raise RuntimeError(
                f"LongCtxCache: layer {self.layer_idx} evicts tokens, but no attention function reported the "
                "previous forward's queries and padding mask to it. The model must run "
                f"attn_implementation={KV_ATTENTION_NAME!r}: use lc.patch(model, kv=...) or "
                f"model.set_attn_implementation({KV_ATTENTION_NAME!r})."
            )
        if self._chosen_channels is not None:
            self._prune_channels()
        new = key_states.shape[-2]
        target = self.eviction_target(new)
        if target is not None:
            self._evict(target, incoming=new)
        self.static_step = self.static and (new == 1 or self.block > 0)
        if self.static_step:
            return self._block_update(key_states, value_states) if self.block else self._static_update(
                key_states, value_states)
        start, stop = self.stored_length, self.stored_length + new
        self._make_room(stop, new)
        if self.record_past and self.policy is not None:
            self._recorded_peak = max(self._recorded_peak, stop)
        if self.key_channels is not None:
            key_states = key_states.gather(-1, self.key_channels[:, :, None].expand(-1, -1, new, -1))
        self.keys[:, :, start:stop] = key_states
        self.values[:, :, start:stop] = value_states
        self.valid[:, start:stop] = True  # the attention function's report marks padding
        self.scores[:, :, start:stop] = 0
        self.stored_length = stop
        self.cumulative_length += new
        self._since_eviction += new
        if new > 1 and not self.record_past:
            self.prompt_length = self.cumulative_length
        if self.static:
            self.static_length.fill_(stop)
        keys, values = self._attended_keys(stop), self.values[:, :, :stop]
        if self.view is not None:
            announce(self, keys)  # the attention function applies the view (no report: drafts leave no scores)
        elif self.policy is not None:
            announce(self, keys)
            self._awaiting_report = True
        return keys, values

    # ------------------------------------------------------------------------ static decoding
    def set_static(self, on: bool, padding: torch.Tensor | None = None) -> None:
        """Enter (``on``) or leave static decoding (see the module docstring).

        Args:
            padding: entering: the (B, >= stored_length) bool 2D padding mask of the tokens seen so far (its
                last ``stored_length`` columns are the stored slots), for a layer without a policy (one with a
                policy knows its slots' validity from the attention's reports); None: no padding.
        Raises:
            ValueError: ThinK's pruned key channels, a draft view, or a layer that evicted without a policy
                report (nothing to attend) cannot decode statically.
        """
        if not on:
            self._score_pending()
            self.static = self.static_step = False
            self.static_length = self._static_pending = self._static_slot = None
            return
        if not self.is_initialized:
            raise ValueError(f"LongCtxCache: layer {self.layer_idx} is empty; prefill before static decoding")
        if self.key_channels is not None or self._chosen_channels is not None:
            raise ValueError("LongCtxCache: static decoding (cuda_graphs) does not support policy 'think' "
                             "(its keys are rebuilt at every step)")
        if self.view is not None:
            raise ValueError("LongCtxCache: static decoding cannot run while a draft view is set")
        if padding is not None and self.policy is None:
            stored = self.stored_length
            self.valid[:, :stored] = padding[:, padding.shape[1] - stored :].to(self.device, torch.bool)
            self.padded = True
        self.static = True
        self.static_length = torch.full((1,), self.stored_length, dtype=torch.long, device=self.device)
        self._static_slot = torch.zeros(1, dtype=torch.long, device=self.device)

    def reserve_static(self, steps: int) -> None:
        """Size the buffers for ``steps`` more static one-token steps (plus one spare slot, so that a query is
        never in the last slot), reallocating now if they are too small (the buffers then move)."""
        budget = None if self.policy is None else self.policy.budget(self.prompt_length)
        peak = self.stored_length + steps
        if budget is not None:  # one-token steps never hold more than budget + every before evicting
            peak = min(peak, max(self.stored_length + 1, budget + self.policy.feature.every))
        needed = peak + 1
        if needed > self.capacity:
            if self.fixed_capacity is not None:
                raise ValueError(
                    f"LongCtxCache: `capacity` ({self.fixed_capacity} tokens) is too small for static decoding, "
                    f"which needs {needed} slots in layer {self.layer_idx}"
                )
            self._allocate(_round_up(needed))
        # Slots past the stored ones are read as masked keys (the PyTorch reference multiplies their values by 0):
        # they must hold finite numbers, not what torch.empty left.
        self.keys[:, :, self.stored_length :].zero_()
        self.values[:, :, self.stored_length :].zero_()

    def static_ready(self) -> bool:
        """Whether the next one-token step is a plain static write (no eviction, no scoring due), so that a
        captured step can stand for it; otherwise it must run eagerly."""
        if self.eviction_target(1) is not None or self._awaiting_report:
            return False
        pending = self.policy is not None and self.policy.uses_attention
        return not pending or self._static_count + 1 < _PENDING_STEPS

    def static_signature(self) -> tuple:
        """What a captured step depends on besides device data: buffer addresses and the code path taken."""
        return (self.keys.data_ptr(), self.values.data_ptr(), self.valid.data_ptr(), self.scores.data_ptr(),
                self.capacity, self.padded, self.has_holes, self.position_offset is None, self.view)

    def host_counters(self) -> tuple[int, ...]:
        """The host-side counters a one-token step advances (``restore_counters`` puts them back)."""
        return self.stored_length, self.cumulative_length, self._since_eviction, self._static_count

    def restore_counters(self, counters: tuple[int, ...]) -> None:
        self.stored_length, self.cumulative_length, self._since_eviction, self._static_count = counters

    def advance_static(self) -> None:
        """Host bookkeeping of a replayed static step (the device did the writes)."""
        self.stored_length += 1
        self.cumulative_length += 1
        self._since_eviction += 1  # as the eager step counts it: a crop may remove the token
        if self.policy is not None and self.policy.uses_attention:
            self._static_count += 1

    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write one token at the device counter's slot; return the whole buffers (see the module docstring)."""
        if self.stored_length + 1 >= self.capacity:
            raise RuntimeError(
                f"LongCtxCache: layer {self.layer_idx} is in static decoding and full ({self.capacity} slots); "
                "reserve_static() must size it for the steps first"
            )
        slot = self.static_length
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.valid.index_fill_(1, slot, True)
        if self.policy is not None:  # scores are a policy's
            self.scores.index_fill_(2, slot, 0.0)
        slot.add_(1)
        self.stored_length += 1
        self.cumulative_length += 1
        self._since_eviction += 1
        announce(self, self.keys)
        self._awaiting_report = self.policy is not None
        return self.keys, self.values

    def begin_block(self, tokens: int) -> None:
        """Make the next update (of ``tokens`` tokens, while static and without a policy) a static block."""
        if not self.static or self.policy is not None:
            raise ValueError(f"LongCtxCache: layer {self.layer_idx}: a static block needs static decoding without "
                             "eviction")
        self.block = tokens

    def _block_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write the block's tokens at the slots from the device counter; return the whole buffers."""
        if key_states.shape[-2] != self.block or self.stored_length + self.block >= self.capacity:
            raise RuntimeError(
                f"LongCtxCache: layer {self.layer_idx}: a static block of {self.block} tokens got "
                f"{key_states.shape[-2]}, or does not fit ({self.stored_length} of {self.capacity} slots stored)"
            )
        slots = self.static_length + torch.arange(self.block, device=self.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.valid.index_fill_(1, slots, True)  # (no scores: a block runs without a policy)
        announce(self, self.keys)
        return self.keys, self.values

    def block_kv_valid(self) -> torch.Tensor:
        """(B, capacity) bool: the real slots below the device counter and the block's slots after it."""
        return self.valid & (torch.arange(self.capacity, device=self.device) < self.static_length + self.block)

    def accept_block(self, accepted: torch.Tensor) -> None:
        """End the block: slot j of row b stays real if j <= ``accepted[b]`` ((B,) int64), the rest become holes;
        the device counter (and its host mirrors) move past the block."""
        tokens = self.block
        offsets = torch.arange(tokens, device=self.device)
        self.valid.index_copy_(1, self.static_length + offsets, offsets <= accepted[:, None].to(self.device))
        self.static_length.add_(tokens)
        self.block = 0
        self.advance_block(tokens)

    def advance_block(self, tokens: int) -> None:
        """Host bookkeeping of an accepted block of ``tokens`` slots (also after a replayed one)."""
        self.stored_length += tokens
        self.cumulative_length += tokens
        self._since_eviction += tokens
        self.padded = self.has_holes = True

    def expect_holes(self) -> None:
        """Static blocks will leave holes: take the masked path from the next step on, so that the code path (and
        a graph captured on it) does not change after the first block."""
        self.padded = self.has_holes = True

    def rewind_static(self, tokens: int) -> None:
        """Forget the last ``tokens`` static steps (the draft steps before a block): the device counter moves back
        by that many, with no host value written to the device."""
        self.static_length.sub_(tokens)
        self.stored_length -= tokens
        self.cumulative_length -= tokens
        self._since_eviction -= tokens

    def static_kv_valid(self) -> torch.Tensor:
        """(B, capacity) bool: the slots below the device counter that hold real tokens."""
        stored = torch.arange(self.capacity, device=self.device) < self.static_length
        return stored & self.valid if self.padded else stored.expand(self.valid.shape[0], -1)

    def static_spans(self) -> torch.Tensor:
        """(B, 2) int32 [first real slot, device counter) of each row: the kernel's key spans (padding, and
        after an eviction the kept padding, precede the real tokens, so they are one contiguous run, unless
        ``has_holes``: then the kernel reads ``static_kv_valid`` instead)."""
        end = self.static_length.expand(self.valid.shape[0])
        if self.padded:
            first = (self.valid & (torch.arange(self.capacity, device=self.device) < self.static_length)).byte()
            start = torch.where(first.any(-1).bool(), first.argmax(-1), end)
        else:
            start = torch.zeros_like(end)
        return torch.stack([start, end], dim=1).to(torch.int32)

    def observe_static(self, query: torch.Tensor, scale: float | None, softcap: float | None) -> None:
        """The attention's report on a static step: keep the (B, H, 1, D) query for the policy's scores."""
        self._awaiting_report = False
        self._scaling = (scale, softcap)
        if not self.policy.uses_attention:
            return
        if self._static_pending is None or self._static_pending.shape[:2] != query.shape[:2]:
            self._static_pending = query.new_zeros(*query.shape[:2], _PENDING_STEPS, query.shape[-1])
        self._static_pending.index_copy_(2, self._static_slot, query)
        self._static_slot.add_(1)
        self._static_count += 1
        if self._static_count >= _PENDING_STEPS:  # never in a captured step (``static_ready``)
            self._score_pending()

    # --------------------------------------------------------------------------- draft view
    def set_view(self, view: SinkAttention | None) -> None:
        """Attend through ``view`` (a sink + window rule over the stored slots) until ``set_view(None)``.

        Only the ``longctx_kv`` attention function applies it (it claims this layer); tokens stored meanwhile
        are stored as usual and should be cropped afterwards.
        """
        self.view = view

    def view_valid(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, stored_length) bool real slots for an attention through the view, or None (all real).

        A layer with a policy knows its slots' validity (reported by earlier forwards, holes included);
        otherwise the forward's 2D padding mask (``attention_mask``, the stored slots' columns) tells it.
        """
        if self.policy is not None:
            return self.valid[:, : self.stored_length] if self.padded else None
        return attention_mask

    def mark_holes(self, holes: torch.Tensor, start: int) -> None:
        """Mark slots as no longer holding real tokens (rejected drafts of some rows).

        Args:
            holes: (B, k) bool, True where logical token ``start + j`` of the row is a hole. Tokens not seen
                yet are ignored (their forward's padding mask will say it).
            start: logical index of the first column; every seen one must still be stored in order.
        """
        seen = min(holes.shape[1], self.cumulative_length - start)
        if not self.is_initialized or seen <= 0 or (self.policy is None and not self.static):
            return  # without a policy the 2D padding mask alone marks holes (a static step reads `valid`)
        if self.cumulative_length - start > self._since_eviction:
            raise ValueError(
                f"LongCtxCache: layer {self.layer_idx} cannot mark holes from token {start}: only the last "
                f"{self._since_eviction} tokens are stored in order"
            )
        self._score_pending()  # with the validity their steps saw
        first = self.stored_length - (self.cumulative_length - start)
        self.valid[:, first : first + seen] &= ~holes[:, :seen].to(self.device)
        self.padded = self.has_holes = True

    def _attended_keys(self, stored: int) -> torch.Tensor:
        """(B, H_kv, stored, D) keys for attention: the buffer's view, or with ThinK the stored
        channels in place and zeros in the pruned ones (so q.k sums over the stored channels)."""
        if self.key_channels is None:
            return self.keys[:, :, :stored]
        full = self.keys.new_zeros(*self.keys.shape[:2], stored, self.head_dim)
        index = self.key_channels[:, :, None].expand(-1, -1, stored, -1)
        return full.scatter_(-1, index, self.keys[:, :, :stored])

    def _prune_channels(self) -> None:
        """Store only ThinK's chosen key channels from now on (the buffers' key size shrinks)."""
        channels, self._chosen_channels = self._chosen_channels, None
        stored = self.stored_length
        kept = self.keys[:, :, :stored].gather(-1, channels[:, :, None].expand(-1, -1, stored, -1))
        self.key_channels = channels
        self._shape = (*self._shape[:2], channels.shape[-1], self._shape[3])
        batch, kv_heads, key_dim, _ = self._shape
        self.keys = torch.empty(batch, kv_heads, self.capacity, key_dim, dtype=self.dtype, device=self.device)
        self.keys[:, :, :stored] = kept

    def observe(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """The attention function's report on the forward that just stored the latest tokens.

        Args:
            query: (B, H, Sq, D) post-RoPE queries of the Sq newest tokens.
            key: (B, H_kv, stored_length, D) the keys this layer returned for the forward.
            attention_mask: None (no padding among them) or a 2D (B, >= Sq) bool mask whose last Sq
                columns are the new tokens.
            scale, softcap: the model's attention scale and logit soft-cap.
        Returns:
            (B, stored_length) bool: which stored slots hold real tokens (the attention's key mask), or None
            while no padding mask was ever reported (every slot is real; the attention then needs no mask).
        """
        self._awaiting_report = False
        self._scaling = (scale, softcap)
        stored, new = self.stored_length, query.shape[2]
        if attention_mask is not None:
            self.valid[:, stored - new : stored] = attention_mask[:, -new:]
            self.padded = True
        valid = self.valid[:, :stored]
        if self.policy.uses_attention and new == 1:
            self._pending.append(query)  # scored before the next eviction (see the module docstring)
            if len(self._pending) >= _PENDING_STEPS:
                self._score_pending(key)
        elif self.policy.uses_attention:
            self._score_pending(key[:, :, : stored - new])
            self.policy.observe(self.scores[:, :, :stored], query, key, valid, scale, softcap)
        if self.key_channels is None and self._chosen_channels is None and new > 1 and not self.record_past:
            self._chosen_channels = self.policy.choose_channels(query, key, valid)
        return valid if self.padded else None

    def _score_pending(self, key: torch.Tensor | None = None) -> None:
        """Score the queries of the decoding steps kept since the last scoring (they are the latest tokens of
        ``key``, (B, H_kv, S, D) the attended keys of the first S slots; default: every stored slot)."""
        if self._static_count:
            self._pending.append(self._static_pending[:, :, : self._static_count].clone())
            self._static_count = 0
            self._static_slot.zero_()
        if not self._pending:
            return
        queries, self._pending = torch.cat(self._pending, dim=2), []
        key = self._attended_keys(self.stored_length) if key is None else key
        slots = key.shape[2]
        self.policy.observe(
            self.scores[:, :, :slots], queries, key, self.valid[:, :slots], *self._scaling, decoding=True
        )

    def _evict(self, target: int, incoming: int = 0) -> None:
        """Keep ``target`` slots per row and head, as the policy selects, compacted to the front.

        Buffers larger than the layer's bound around this write of ``incoming`` tokens shrink to it
        (then the evicted memory is freed: no reference to the old buffers is left).
        """
        self._score_pending()
        stored = self.stored_length
        valid = self.valid[:, :stored]
        keep = self.policy.select(self.scores[:, :, :stored], valid, target)  # (B, H_kv, target)
        real = valid[:, None].expand(-1, keep.shape[1], -1).gather(-1, keep)
        keep = keep.gather(-1, (keep + real.long() * stored).argsort(dim=-1))  # padding first, then in order
        real_tokens = valid.sum(-1)
        kept_real = real_tokens.clamp(max=target)
        self.evicted += real_tokens - kept_real
        keys = self.keys[:, :, :stored].gather(2, keep[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        values = self.values[:, :, :stored].gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        scores = self.scores[:, :, :stored].gather(2, keep)
        self.stored_length = 0
        bound = self._bound(incoming)
        if self.fixed_capacity is None and not self.static and self.capacity > bound:
            self._allocate(bound)  # really free the memory of the evicted tokens
        self.keys[:, :, :target] = keys
        self.values[:, :, :target] = values
        self.scores[:, :, :target] = scores
        self.valid[:, :target] = torch.arange(target, device=self.device) >= (target - kept_real)[:, None]
        self.stored_length = target
        self._since_eviction = 0
        if self.static:
            self.static_length.fill_(target)

    # ----------------------------------------------------------------------------- rollback
    def activate_past_recording(self) -> None:
        """Defer eviction to ``crop`` so that the tokens of the next forwards can be rolled back."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the ``-tokens_to_remove`` latest tokens, then run an eviction that was deferred.

        Only tokens stored since the last eviction can be removed (call ``activate_past_recording``
        before the forwards to roll back). ``crop(0)`` only runs the deferred eviction.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove; positive sizes are "
                "not supported"
            )
        if not self.is_initialized:
            return
        self._score_pending()  # rejected tokens' queries were attended: they count, as at their own steps
        remove = -tokens_to_remove
        if remove > self._since_eviction:
            raise ValueError(
                f"LongCtxCache: cannot crop {remove} tokens from layer {self.layer_idx}: only the last "
                f"{self._since_eviction} are still stored in order; call activate_past_recording() before "
                "the forward passes that may be rolled back"
            )
        self.stored_length -= remove
        self.cumulative_length -= remove
        self._since_eviction -= remove
        self.prompt_length = min(self.prompt_length, self.cumulative_length)
        if self.static:
            self.static_length.fill_(self.stored_length)
        target = self.eviction_target(at_crop=True)  # the eviction the next one-token step would run
        if target is not None:
            self._evict(target, incoming=1)

    # ------------------------------------------------------------------------- batch changes
    def _map_batch(self, fn) -> None:
        """Apply ``fn`` (tensor -> tensor along dim 0) to the buffers and the per-slot metadata."""
        if self.is_initialized:
            self.keys, self.values, self.valid, self.scores, self.evicted = map(
                fn, (self.keys, self.values, self.valid, self.scores, self.evicted)
            )
            self._shape = (self.keys.shape[0], *self._shape[1:])
            if self.key_channels is not None:
                self.key_channels = fn(self.key_channels)
            if self._chosen_channels is not None:
                self._chosen_channels = fn(self._chosen_channels)
            if self._pending:
                self._pending = [fn(torch.cat(self._pending, dim=2))]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row ``beam_idx[i]``."""
        self._map_batch(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda tensor: tensor[indices])

    def reset(self) -> None:
        """Forget every token; the buffers are kept for the next sequence (reallocated with ThinK,
        whose channel choice belongs to the sequence)."""
        self.stored_length = self.cumulative_length = self.prompt_length = self._since_eviction = 0
        if self.evicted is not None:
            self.evicted.zero_()
        self._awaiting_report = False
        self.record_past = self.padded = self.has_holes = False
        self._pending, self._recorded_peak, self._static_count = [], 0, 0
        self.view = None
        self.set_static(False)
        if self.key_channels is not None or self._chosen_channels is not None:
            self.keys = self.values = self.valid = self.scores = None
            self.key_channels = self._chosen_channels = None
            self.is_initialized = False
