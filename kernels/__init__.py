"""Triton kernels of fastmerge, one module per op (installed as ``fastmerge.kernels``).

Each function takes flat 1-D tensors on a CUDA device (or CPU tensors under ``TRITON_INTERPRET=1``)
whose arguments were already validated by ``fastmerge``'s op layer, and mirrors the CPU
extension's signature. Use them through ``fastmerge.<op>(..., backend="triton")`` (the default for
CUDA tensors) rather than directly.
"""

from .block_scale import block_scale, block_scale_backward
from .merge_ties import last_stats as ties_last_stats
from .merge_ties import merge_ties
from .task_arithmetic import task_arithmetic
from .task_vector_cosine import gram
from .uniform_average import uniform_average

__all__ = ["uniform_average", "task_arithmetic", "gram", "block_scale", "block_scale_backward", "merge_ties",
           "ties_last_stats"]
