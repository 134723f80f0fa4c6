"""The same configs through ``fastmerge merge`` and mergekit 0.1.5's ``mergekit-yaml`` give the same tensors
(rtol 1e-5) for every deterministic method, on float32 checkpoints.

mergekit is not a dependency: this runs only where ``mergekit-yaml`` is found, from
``FASTMERGE_MERGEKIT_YAML`` (e.g. a separate virtualenv's ``bin/mergekit-yaml``) or on PATH, and is
skipped elsewhere (CI does not install mergekit)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from fastmerge.merge import merge_checkpoints
from fastmerge.merge.io import Checkpoint

MERGEKIT = os.environ.get("FASTMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set FASTMERGE_MERGEKIT_YAML)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fastmerge.benchmarks.merge_bench import make_checkpoints

    return make_checkpoints(str(tmp_path_factory.mktemp("mk")), "tiny", 3, "float32", seed=11, noise=0.2)


def _models_block(paths, params):
    return "".join(f"  - model: {p}\n" + (f"    parameters: {params(i)}\n" if params else "") for i, p in enumerate(paths))


def configs(m):
    base, fts = m[0], m[1:]
    w = lambda i: f"{{weight: {1.0 - 0.25 * i}, density: {0.3 + 0.2 * i}}}"  # noqa: E731
    yield "linear", f"merge_method: linear\nmodels:\n{_models_block(m, lambda i: '{weight: %s}' % (0.5 + i))}"
    for method in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        extra = "parameters: {lambda: 0.9, normalize: true}\n" if method != "breadcrumbs" else ""
        yield method, f"merge_method: {method}\nbase_model: {base}\nmodels:\n{_models_block(fts, w)}{extra}"
    yield "ties_rescale", (f"merge_method: ties\nbase_model: {base}\nmodels:\n{_models_block(fts, w)}"
                           "parameters: {rescale: true}\n")
    yield "model_stock", f"merge_method: model_stock\nbase_model: {base}\nmodels:\n{_models_block(fts, None)}"
    yield "slerp", (f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {fts[0]}\n"
                    "parameters:\n  t:\n    - filter: mlp\n      value: [0.1, 0.9]\n    - value: 0.4\n")
    yield "gradient_filter", (
        f"merge_method: linear\nmodels:\n  - model: {fts[0]}\n    parameters:\n      weight:\n"
        f"        - filter: self_attn\n          value: [0.1, 0.9]\n        - value: 0.5\n"
        f"  - model: {fts[1]}\n    parameters:\n      weight: [0.9, 0.1]\n")
    yield "passthrough_slices", (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {fts[0]}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {fts[1]}\n        layer_range: [1, 2]\n")
    yield "linear_slices", (
        f"merge_method: linear\nslices:\n  - sources:\n      - model: {fts[0]}\n        layer_range: [0, 2]\n"
        f"        parameters: {{weight: [0.2, 0.8]}}\n      - model: {fts[1]}\n        layer_range: [0, 2]\n"
        f"    parameters: {{weight: 0.5}}\n")


@pytest.mark.parametrize("name", [n for n, _ in configs(["b", "x", "y", "z"])])
def test_same_tensors_as_mergekit(models, tmp_path, name):
    cfg_text = dict(configs(models))[name]
    cfg = tmp_path / "c.yml"
    cfg.write_text(cfg_text)
    ours, theirs = str(tmp_path / "fm"), str(tmp_path / "mk")
    merge_checkpoints(str(cfg), ours, quiet=True)
    r = subprocess.run([MERGEKIT, str(cfg), theirs, "--no-copy-tokenizer", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = Checkpoint(ours), Checkpoint(theirs)
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and x.shape == y.shape, n
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {n}: {m}")
