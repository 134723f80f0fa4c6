"""Loader of the CUDA kernels (fastmerge._C_cuda).

Importing the extension registers torch.ops.fastmerge_cuda.<name> for the CUDA dispatch key.
AVAILABLE tells whether it loaded; ERROR keeps the exception when it did not (not built, or built
against another torch/CUDA).

With ``FASTMERGE_CUDA_EMULATE=1`` set before fastmerge is imported, the ``cuda`` backend runs the
same CUDA kernels on CPU tensors instead, in a CPU emulator of the CUDA execution model
(fastmerge._C_cuda_emu, built with ``FASTMERGE_CUDA_EMULATOR=1``; its ops are
torch.ops.fastmerge_cuda_emu.<name>). That is how the CUDA kernels are tested without a GPU; it is
slow, and CUDA tensors are then refused by the ``cuda`` backend.
"""

from __future__ import annotations

import os

import torch

EMULATED = os.environ.get("FASTMERGE_CUDA_EMULATE", "0").strip().lower() in ("1", "true", "yes", "on")
BUILD_HINT = ("build it with FASTMERGE_CUDA_EMULATOR=1 pip install --no-build-isolation -e ." if EMULATED else
              "build it with a CUDA toolkit: FASTMERGE_CUDA=1 pip install --no-build-isolation -e .")

try:
    if EMULATED:
        from . import _C_cuda_emu as _ext
    else:
        from . import _C_cuda as _ext
except (ImportError, OSError) as exc:  # not built here, or an incompatible build
    _ext = None
    AVAILABLE = False
    ERROR: BaseException | None = exc
else:
    AVAILABLE = True
    ERROR = None


def device_type() -> str:
    """The device type of the tensors the ``cuda`` backend takes: "cuda", or "cpu" when emulated."""
    return "cpu" if EMULATED else "cuda"


def ops():
    """The namespace of the CUDA ops: torch.ops.fastmerge_cuda, or torch.ops.fastmerge_cuda_emu."""
    return torch.ops.fastmerge_cuda_emu if EMULATED else torch.ops.fastmerge_cuda


def built_archs() -> str | None:
    """CUDA architectures the extension was compiled for ("80;90"; "emulated" for the CPU emulator),
    or None when it did not load."""
    return _ext.built_archs() if _ext is not None else None


def take_nonfinite() -> bool:
    """Whether the last CUDA op on this thread met a NaN/Inf (clears the note). The ops return
    instead of raising; ``fastmerge``'s op layer asks this after every call and raises the
    ValueError that names the input and index."""
    return bool(_ext.take_nonfinite()) if _ext is not None else False
