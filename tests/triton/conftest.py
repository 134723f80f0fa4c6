"""Tests of the Triton kernels (``fastmerge.kernels``), run on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, set before triton is imported) or on ``cuda`` tensors where a GPU
is present. Anywhere else every test here is skipped."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
ENABLED = INTERPRET or torch.cuda.is_available()
SKIP_REASON = "Triton kernel tests need TRITON_INTERPRET=1 (CPU tensors) or a CUDA GPU"


def _suite_helpers():
    """The main suite's helpers (tests/conftest.py), loaded under a private name: inside this
    directory the module name ``conftest`` is this file, so test modules here import the helpers
    from it (``from conftest import make_tasks, strided``)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")
    spec = importlib.util.spec_from_file_location("_fastmerge_suite_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_helpers = _suite_helpers()
AWKWARD_SIZES = _helpers.AWKWARD_SIZES
SMALL_SIZES = _helpers.SMALL_SIZES
DTYPES = _helpers.DTYPES
make_tasks = _helpers.make_tasks  # CPU tensors; move them with .to(device)
strided = _helpers.strided
assert_rounded_from = _helpers.assert_rounded_from


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu") if INTERPRET else torch.device("cuda")
