"""Triton kernels of fastmerge, one module per op (installed as ``fastmerge.kernels``).

This version ships no Triton kernels yet: GPU tensors run the reference ops (with a warning).
"""
