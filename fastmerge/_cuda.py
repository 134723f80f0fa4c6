"""Loader of the CUDA kernels (fastmerge._C_cuda).

Importing the extension registers torch.ops.fastmerge_cuda.<name> for the CUDA dispatch key.
AVAILABLE tells whether it loaded; ERROR keeps the exception when it did not (not built, or built
against another torch/CUDA).
"""

from __future__ import annotations

try:
    from . import _C_cuda as _ext
except (ImportError, OSError) as exc:  # not built here, or an incompatible build
    _ext = None
    AVAILABLE = False
    ERROR: BaseException | None = exc
else:
    AVAILABLE = True
    ERROR = None


def built_archs() -> str | None:
    """CUDA architectures the extension was compiled for ("80;90"), or None when it did not load."""
    return _ext.built_archs() if _ext is not None else None


def take_nonfinite() -> bool:
    """Whether the last CUDA op on this thread met a NaN/Inf (clears the note). The ops return
    instead of raising; ``fastmerge``'s op layer asks this after every call and raises the
    ValueError that names the input and index."""
    return bool(_ext.take_nonfinite()) if _ext is not None else False
