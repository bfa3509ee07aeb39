"""Attention kernels: Triton implementations and their pure-PyTorch reference.

This package imports only torch (and triton, lazily, in the Triton modules), never transformers.
"""
