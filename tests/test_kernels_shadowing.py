"""The Triton sources' folder ``kernels/`` (installed as ``fastmerge.kernels``) must not hide the PyPI
package ``kernels`` that transformers imports, for a Python started in the repository root (as
``python -m pytest`` is)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_transformers_model_classes_import_from_the_repository_root():
    pytest.importorskip("transformers")
    r = _run("import transformers\n"
             "from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaConfig\n"
             "m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
             " num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
             "print(type(m).__name__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlamaForCausalLM" in r.stdout


def test_top_level_kernels_is_never_the_triton_folder():
    r = _run("import importlib.util, os\n"
             "try:\n"
             "    import kernels\n"
             "except ModuleNotFoundError as e:\n"
             "    print('absent', e)\n"
             "else:\n"
             "    print('file', os.path.abspath(kernels.__file__))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.join(ROOT, "kernels") not in r.stdout, r.stdout
    r = _run("import fastmerge.kernels as K; print(K.__name__, callable(K.merge_ties))")
    if "No module named 'triton'" in r.stderr:
        pytest.skip("triton is not installed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["fastmerge.kernels", "True"]
