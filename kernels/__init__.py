"""Triton kernels of fused_train, one op per module, each with its plain-PyTorch reference beside it.

This package knows tensors, not models: it never imports `fused_train` or transformers.
"""
