"""``fastmerge merge`` against mergekit 0.1.5's ``mergekit-yaml`` on float32 checkpoints: the same tensors
(rtol 1e-5) for every deterministic method, and for the random ones (DARE, DELLA) the same keep rates by
magnitude rank and the same L1 rescaling, since the two draw different random numbers.

mergekit is not a dependency. This file runs where ``mergekit-yaml`` is found, from
``FASTMERGE_MERGEKIT_YAML`` (CI installs mergekit==0.1.5 in a virtualenv of its own and sets it) or on
PATH, and is skipped elsewhere. Where the script's interpreter can be read from its first line, every
config runs in one mergekit process (its start-up is most of the time of a tiny merge)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from fastmerge.merge import merge_checkpoints
from fastmerge.merge.io import Checkpoint

MERGEKIT = os.environ.get("FASTMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set FASTMERGE_MERGEKIT_YAML)")
FLAGS = ["--no-copy-tokenizer", "--quiet", "--random-seed", "0"]

# one mergekit process for many configs: each is run as mergekit-yaml's own command would run it
DRIVER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
for cfg, out, log, flags in json.load(open(sys.argv[1])):
    try:
        main([cfg, out] + flags, standalone_mode=False)
    except BaseException:
        open(log, "w").write(traceback.format_exc())
"""


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


# the random methods, one model: output = base + the kept deltas, rescaled to the delta's L1 norm
RANDOM = {
    "della_linear": ("della_linear", "{weight: 1.0, density: 0.5, epsilon: 0.3}"),
    "dare_linear": ("dare_linear", "{weight: 1.0, density: 0.4}"),
}


def random_configs(m):
    for name, (method, params) in RANDOM.items():
        yield f"random_{name}", (f"merge_method: {method}\nbase_model: {m[0]}\nmodels:\n  - model: {m[1]}\n"
                                 f"    parameters: {params}\nparameters: {{lambda: 1.0}}\n")


def _interpreter(script: str):
    """The Python that runs a console script, from its first line (None where that is not a Python)."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    words = words[1:] if words and os.path.basename(words[0]) == "env" else words
    return words[0] if len(words) == 1 and "python" in os.path.basename(words[0]) else None


@pytest.fixture(scope="module")
def theirs(models, tmp_path_factory):
    """Every config through mergekit: name -> (config path, output folder, error text or None)."""
    root = tmp_path_factory.mktemp("mergekit")
    jobs = {}
    for name, text in list(configs(models)) + list(random_configs(models)):
        cfg = root / f"{name}.yml"
        cfg.write_text(text)
        jobs[name] = (str(cfg), str(root / name), str(root / f"{name}.err"))
    python = _interpreter(MERGEKIT)
    if python:
        listing = root / "jobs.json"
        listing.write_text(json.dumps([[c, o, e, FLAGS] for c, o, e in jobs.values()]))
        r = subprocess.run([python, "-c", DRIVER, str(listing)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        for c, o, e in jobs.values():
            r = subprocess.run([MERGEKIT, c, o] + FLAGS, capture_output=True, text=True)
            if r.returncode:
                with open(e, "w") as f:
                    f.write(r.stderr[-3000:])
    out = {}
    for name, (c, o, e) in jobs.items():
        out[name] = (c, o, open(e).read() if os.path.exists(e) else None)
    return out


def _ours(theirs, name, tmp_path):
    cfg, mk_out, err = theirs[name]
    assert err is None, f"mergekit failed on {name}:\n{err}"
    ours = str(tmp_path / "fm")
    merge_checkpoints(cfg, ours, quiet=True)
    return Checkpoint(ours), Checkpoint(mk_out)


@pytest.mark.parametrize("name", [n for n, _ in configs(["b", "x", "y", "z"])])
def test_same_tensors_as_mergekit(theirs, tmp_path, name):
    a, b = _ours(theirs, name, tmp_path)
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and x.shape == y.shape, n
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {n}: {m}")


def _keep_rates_by_rank(ckpt, base, ft):
    """Over every tensor: the kept share of the lowest and the highest fifth of |delta| ranks (ranked
    along dim 1, as DELLA ranks), and the largest gap, in float32 ulps, between a kept value and
    delta * s, s the tensor's L1 rescale factor |delta|_1 / |kept delta|_1."""
    low = high = n_low = n_high = 0
    worst = 0.0
    for n in ckpt.tensors:
        b = base.get(n).double()
        delta = ft.get(n).double() - b
        got = ckpt.get(n).double() - b
        x = delta.reshape(1, -1) if delta.dim() < 2 else delta
        keep = (got != 0).reshape(x.shape)
        rank = torch.argsort(torch.argsort(x.abs(), dim=1), dim=1).double() / max(1, x.shape[1] - 1)
        low += int(keep[rank < 0.2].sum())
        n_low += int((rank < 0.2).sum())
        high += int(keep[rank > 0.8].sum())
        n_high += int((rank > 0.8).sum())
        kept = torch.where(keep, x, torch.zeros(()))
        s = x.abs().sum() / kept.abs().sum()
        # in float32 ulps of the stored value (base + delta * s is rounded once when written)
        ulp = torch.finfo(torch.float32).eps * (b.reshape(x.shape).abs() + (kept * s).abs())
        gap = ((got.reshape(x.shape) - kept * s).abs() / ulp.clamp(min=1e-30))[keep]
        worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
    return low / n_low, high / n_high, worst


@pytest.mark.parametrize("name", list(RANDOM))
def test_random_methods_keep_by_rank_as_mergekit(theirs, models, tmp_path, name):
    """DELLA keeps an entry with probability rising with its rank from density - epsilon to density +
    epsilon (0.2 to 0.8 here: about 0.26 in the lowest fifth, 0.74 in the highest), DARE with the density
    (0.4) whatever the rank; both rescale the kept deltas to the L1 norm of the delta. A rank rule inverted
    or a missing rescale fails here against mergekit's own output."""
    a, b = _ours(theirs, f"random_{name}", tmp_path)
    base, ft = Checkpoint(models[0]), Checkpoint(models[1])
    want = (0.26, 0.74) if name.startswith("della") else (0.4, 0.4)
    for who, ckpt in (("fastmerge", a), ("mergekit", b)):
        low, high, worst = _keep_rates_by_rank(ckpt, base, ft)
        assert abs(low - want[0]) < 0.015 and abs(high - want[1]) < 0.015, (who, low, high)
        assert worst <= 4.0, (who, worst)
    la, ha, _ = _keep_rates_by_rank(a, base, ft)
    lb, hb, _ = _keep_rates_by_rank(b, base, ft)
    assert abs(la - lb) < 0.02 and abs(ha - hb) < 0.02, ((la, ha), (lb, hb))
