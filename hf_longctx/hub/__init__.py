"""Hugging Face Hub helpers: model cards rendered from ``hf-longctx eval`` results, saved or pushed."""

from .card import push_card_to_hub, render_card, save_card

__all__ = ["push_card_to_hub", "render_card", "save_card"]
