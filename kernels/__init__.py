"""Triton kernels of fastmerge, one module per op (installed as ``fastmerge.kernels``).

Each function takes flat 1-D tensors on a CUDA device (or CPU tensors under ``TRITON_INTERPRET=1``)
whose arguments were already validated by ``fastmerge``'s op layer, and mirrors the CPU
extension's signature. Use them through ``fastmerge.<op>(..., backend="triton")`` (the default for
CUDA tensors) rather than directly.
"""

import sys as _sys

if __name__ == "kernels":  # pragma: no cover - exercised by tests/test_kernels_shadowing.py in a subprocess
    # This folder is installed as fastmerge.kernels. Python started in the repository root sees it as a
    # top-level package named "kernels", the name of an unrelated PyPI package that transformers imports.
    # Step aside: load the installed package of that name in our place (or fail as if none were found).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the folder kernels/ of this checkout is "
                                  "fastmerge.kernels, not a top-level package)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .block_scale import block_scale, block_scale_backward
    from .merge_ties import last_stats as ties_last_stats
    from .merge_ties import merge_ties
    from .task_arithmetic import task_arithmetic
    from .task_vector_cosine import gram
    from .uniform_average import uniform_average

    __all__ = ["uniform_average", "task_arithmetic", "gram", "block_scale", "block_scale_backward", "merge_ties",
               "ties_last_stats"]
