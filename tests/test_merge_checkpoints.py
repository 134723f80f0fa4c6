"""``fastmerge merge`` end to end on tiny Llama checkpoints made by transformers: configs, outputs that
transformers loads, sharding, slices and gradients, the random methods' seeds, global-scope TIES, and
every bad input (one clear line, nothing half-written)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastmerge._ops import _C
from fastmerge.merge import (CheckpointError, ConfigError, MergeError, MergeInterrupted, PlanError, dry_run,
                             merge_checkpoints)
from fastmerge.merge import io as mio
from fastmerge.merge import run as mrun
from fastmerge.merge.io import Checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(_C is None, reason="the compiled extension is not built")


def _tiny_llama(path: str, seed: int, base_state=None, dtype=torch.float32, tie=False, layers=3, arch=None):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
        model.load_state_dict(sd, strict=False)
    model.to(dtype).save_pretrained(path)
    if arch:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c["architectures"] = [arch]
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    return model.state_dict()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = str(root / "base")
    sd = _tiny_llama(base, 0)
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    with open(os.path.join(base, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0"}, f)
    fts = []
    for i in range(3):
        p = str(root / f"ft{i}")
        _tiny_llama(p, i + 1, sd)
        fts.append(p)
    bf = [str(root / "bf_base")] + [str(root / f"bf_ft{i}") for i in range(2)]
    _tiny_llama(bf[0], 0, dtype=torch.bfloat16)
    for i, p in enumerate(bf[1:]):
        _tiny_llama(p, 10 + i, sd, dtype=torch.bfloat16)
    other = str(root / "mistral")
    _tiny_llama(other, 5, sd, arch="MistralForCausalLM")
    return {"base": base, "fts": fts, "bf16": bf, "other": other, "root": root}


def ties_config(l, density=0.5, extra=""):
    models = "\n".join(f"  - model: {p}\n    parameters: {{weight: {1 - 0.2 * i}, density: {density}}}"
                       for i, p in enumerate(l["fts"]))
    return f"merge_method: ties\nbase_model: {l['base']}\nmodels:\n{models}\n{extra}"


def no_leftovers(out: str):
    parent = os.path.dirname(os.path.abspath(out))
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if f.endswith(".partial")]


def test_ties_merge_loads_in_transformers(llamas, tmp_path):
    out = str(tmp_path / "merged")
    res = merge_checkpoints(ties_config(llamas), out, out_shard_size="30K", quiet=True)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "model-00001-of-%05d.safetensors" % len(res.shards) in files
    assert len(res.shards) > 2
    for f in ("config.json", "README.md", "mergekit_config.yml", "tokenizer.json", "tokenizer_config.json"):
        assert f in files
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "ties" in card and llamas["fts"][0] in card and "merge_method: ties" in card
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.arange(10).reshape(1, 10)).logits
    assert logits.shape == (1, 10, 96) and torch.isfinite(logits).all()
    # the fused kernels give the twins' tensors bit for bit (no rescaling in ties)
    ref = str(tmp_path / "ref")
    merge_checkpoints(ties_config(llamas), ref, quiet=True, reference=True)
    a, b = Checkpoint(out), Checkpoint(ref)
    assert set(a.tensors) == set(b.tensors)
    for n in a.tensors:
        assert torch.equal(a.get(n), b.get(n)), n


def test_global_scope_ties_matches_the_reference_threshold(llamas, tmp_path):
    cfg = ties_config(llamas, 0.3, "parameters: {scope: global}\n")
    out, ref = str(tmp_path / "g"), str(tmp_path / "gref")
    merge_checkpoints(cfg, out, quiet=True)
    merge_checkpoints(cfg, ref, quiet=True, reference=True)
    a, b = Checkpoint(out), Checkpoint(ref)
    for n in a.tensors:
        assert torch.equal(a.get(n), b.get(n)), n
    tensor_scope = str(tmp_path / "t")
    merge_checkpoints(ties_config(llamas, 0.3), tensor_scope, quiet=True)
    c = Checkpoint(tensor_scope)
    assert any(not torch.equal(a.get(n), c.get(n)) for n in a.tensors)  # one threshold per model is not per tensor
    with pytest.raises(ConfigError, match="one density per model"):
        merge_checkpoints(ties_config(llamas, "[0.2, 0.5]", "parameters: {scope: global}\n"), str(tmp_path / "x"),
                          quiet=True)


def test_bf16_inputs_compute_in_fp32_and_write_the_base_dtype(llamas, tmp_path):
    bf = llamas["bf16"]
    cfg = (f"merge_method: task_arithmetic\nbase_model: {bf[0]}\nmodels:\n"
           + "".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}\n" for p in bf[1:]))
    out = str(tmp_path / "bf")
    merge_checkpoints(cfg, out, quiet=True)
    ck = Checkpoint(out)
    b, x, y = (Checkpoint(p) for p in bf)
    name = "model.layers.1.mlp.up_proj.weight"
    assert ck.get(name).dtype == torch.bfloat16
    expect = (b.get(name).float() + 0.5 * (x.get(name).float() - b.get(name).float())
              + 0.5 * (y.get(name).float() - b.get(name).float())).bfloat16()
    assert torch.equal(ck.get(name), expect)
    out32 = str(tmp_path / "bf32")
    merge_checkpoints(cfg + "out_dtype: float32\n", out32, quiet=True)
    assert Checkpoint(out32).get(name).dtype == torch.float32
    with open(os.path.join(out32, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"


def test_slices_passthrough_and_layer_gradients(llamas, tmp_path):
    base, ft0 = llamas["base"], llamas["fts"][0]
    cfg = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n"
           f"  - sources:\n      - model: {ft0}\n        layer_range: [1, 3]\n")
    out = str(tmp_path / "franken")
    merge_checkpoints(cfg, out, quiet=True)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 4
    ck, b, f0 = Checkpoint(out), Checkpoint(base), Checkpoint(ft0)
    assert torch.equal(ck.get("model.layers.3.mlp.up_proj.weight"), f0.get("model.layers.2.mlp.up_proj.weight"))
    assert torch.equal(ck.get("model.layers.1.mlp.up_proj.weight"), b.get("model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(ck.get("model.embed_tokens.weight"), b.get("model.embed_tokens.weight"))  # first slice
    assert torch.equal(ck.get("model.norm.weight"), f0.get("model.norm.weight"))  # last slice
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    # a weight gradient over 3 layers and a filter: layer i gets weight [0, 1] at t = i / 2
    cfg = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters:\n      weight:\n"
           f"        - filter: mlp\n          value: [0.0, 1.0]\n        - value: 1.0\n"
           f"  - model: {ft0}\n    parameters: {{weight: 1.0}}\nparameters: {{normalize: false}}\n")
    out = str(tmp_path / "grad")
    merge_checkpoints(cfg, out, quiet=True)
    ck = Checkpoint(out)
    for i, w in enumerate([0.0, 0.5, 1.0]):
        n = f"model.layers.{i}.mlp.down_proj.weight"
        torch.testing.assert_close(ck.get(n), w * b.get(n) + f0.get(n), rtol=0, atol=0)
        n = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(ck.get(n), b.get(n) + f0.get(n), rtol=0, atol=0)


def test_random_methods_depend_on_the_seed_only(llamas, tmp_path):
    cfg = ties_config(llamas, 0.4).replace("merge_method: ties", "merge_method: dare_ties")
    outs = []
    for k, (seed, threads) in enumerate([(3, 1), (3, 2), (4, 2)]):
        out = str(tmp_path / f"dare{k}")
        merge_checkpoints(cfg, out, quiet=True, random_seed=seed, threads=threads, prefetch=k)
        outs.append(Checkpoint(out))
    torch.set_num_threads(os.cpu_count() or 1)
    names = list(outs[0].tensors)
    assert all(torch.equal(outs[0].get(n), outs[1].get(n)) for n in names)
    assert any(not torch.equal(outs[0].get(n), outs[2].get(n)) for n in names)
    ref = str(tmp_path / "dare_ref")
    merge_checkpoints(cfg, ref, quiet=True, random_seed=3, reference=True)
    r = Checkpoint(ref)
    for n in names:  # same kept entries; the L1 rescale factor is summed in float64 here, float32 there
        torch.testing.assert_close(outs[0].get(n), r.get(n), rtol=1e-5, atol=1e-7)
        assert torch.equal(outs[0].get(n) != Checkpoint(llamas["base"]).get(n), r.get(n) != Checkpoint(
            llamas["base"]).get(n))


def test_dry_run_reads_headers_only_and_overwrite(llamas, tmp_path):
    import fastmerge

    assert fastmerge.merge_checkpoints is merge_checkpoints
    text = dry_run(ties_config(llamas))
    assert "memory needed" in text and "bytes read" in text and "output tensors" in text
    out = str(tmp_path / "o")
    os.makedirs(out)
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        merge_checkpoints(ties_config(llamas), out, quiet=True)
    merge_checkpoints(ties_config(llamas), out, quiet=True, overwrite=True)
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_model_from_the_hub_cache(llamas, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(llamas["fts"][0], snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = f"merge_method: task_arithmetic\nbase_model: {llamas['base']}\nmodels:\n  - model: org/tiny\n    parameters: {{weight: 1}}\n"
    out = str(tmp_path / "hub_out")
    merge_checkpoints(cfg, out, quiet=True)
    assert torch.equal(Checkpoint(out).get("lm_head.weight"), Checkpoint(llamas["fts"][0]).get("lm_head.weight"))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*nothing is downloaded"):
        merge_checkpoints(cfg.replace("org/tiny", "org/absent"), str(tmp_path / "x"), quiet=True)


# ------------------------------------------------------------------------------- bad input

def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_not_safetensors_and_truncated(llamas, tmp_path):
    bad = _copy_model(llamas["fts"][1], tmp_path / "bad")
    with open(os.path.join(bad, "model.safetensors"), "wb") as f:
        f.write(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    cfg = ties_config(llamas).replace(llamas["fts"][1], bad)
    out = str(tmp_path / "o")
    with pytest.raises(CheckpointError, match=rf"model {bad}: .*model.safetensors is not a safetensors file.*re-download"):
        merge_checkpoints(cfg, out, quiet=True)
    no_leftovers(out)
    good = os.path.join(llamas["fts"][1], "model.safetensors")
    data = open(good, "rb").read()
    with open(os.path.join(bad, "model.safetensors"), "wb") as f:
        f.write(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"is truncated: tensor .* ends at byte .*re-download"):
        merge_checkpoints(cfg, out, quiet=True)
    no_leftovers(out)


def test_nan_input_is_found_in_the_pass(llamas, tmp_path):
    bad = _copy_model(llamas["fts"][2], tmp_path / "nan")
    ck = Checkpoint(bad)
    info = ck.tensors["model.layers.1.self_attn.v_proj.weight"]
    ck.close()
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.seek(info.start + 4 * 17)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())
    for method in ("ties", "task_arithmetic", "slerp"):
        cfg = ties_config(llamas).replace(llamas["fts"][2], bad)
        if method == "slerp":
            cfg = (f"merge_method: slerp\nbase_model: {llamas['base']}\nmodels:\n  - model: {llamas['base']}\n"
                   f"  - model: {bad}\nparameters: {{t: 0.5}}\n")
        else:
            cfg = cfg.replace("merge_method: ties", f"merge_method: {method}")
        out = str(tmp_path / f"o_{method}")
        with pytest.raises(MergeError, match=rf"model {bad}: tensor model.layers.1.self_attn.v_proj.weight holds nan "
                                             rf"at flat index 17; the checkpoint is corrupt"):
            merge_checkpoints(cfg, out, quiet=True)
        no_leftovers(out)


def test_mixed_architectures_need_allow_crimes(llamas, tmp_path):
    cfg = ties_config(llamas).replace(llamas["fts"][0], llamas["other"])
    out = str(tmp_path / "o")
    with pytest.raises(PlanError, match=r"model .*mistral is a MistralForCausalLM, but .* is a LlamaForCausalLM.*"
                                        r"--allow-crimes"):
        merge_checkpoints(cfg, out, quiet=True)
    no_leftovers(out)
    merge_checkpoints(cfg, out, quiet=True, allow_crimes=True)


@pytest.mark.parametrize("density", [0, -0.5, 1.5])
def test_density_outside_the_interval(llamas, tmp_path, density):
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=rf"model .*ft0: density {float(density)} for tensor .* is outside \(0, 1\]"):
        merge_checkpoints(ties_config(llamas, density), out, quiet=True)
    no_leftovers(out)


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.5), (0.2, 0.3), (0.8, 0.25)])
def test_della_probabilities_outside_the_interval(llamas, tmp_path, density, epsilon):
    cfg = ties_config(llamas, density).replace("merge_method: ties", "merge_method: della")
    cfg = cfg.replace(f"density: {density}", f"density: {density}, epsilon: {epsilon}")
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=rf"model .*ft0: DELLA's keep probabilities density \+/- epsilon "
                                        rf"\({density} \+/- {epsilon}\) for tensor .* must lie inside \(0, 1\)"):
        merge_checkpoints(cfg, out, quiet=True)
    no_leftovers(out)


def test_plan_errors(llamas, tmp_path):
    out = str(tmp_path / "o")
    cases = [
        (ties_config(llamas) + "tokenizer: {source: union}\n", ConfigError, "unsupported key 'tokenizer'"),
        (ties_config(llamas) + "colour: red\n", ConfigError, "unknown key 'colour'"),
        (ties_config(llamas).replace("ties", "magic"), ConfigError, "unknown merge_method 'magic'"),
        (ties_config(llamas).replace("weight: 1.0, ", ""), ConfigError, "missing parameter 'weight'"),
        (ties_config(llamas).replace(llamas["fts"][0], str(tmp_path / "nowhere")), CheckpointError,
         "not a local folder and not in the Hugging Face cache"),
    ]
    for cfg, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            merge_checkpoints(cfg, out, quiet=True)
        no_leftovers(out)
    short = _copy_model(llamas["fts"][0], tmp_path / "short")
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(short, "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"][:16].clone()
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, os.path.join(short, "model.safetensors"))
    with pytest.raises(PlanError, match=r"tensor model.layers.2.mlp.up_proj.weight is missing"):
        merge_checkpoints(ties_config(llamas).replace(llamas["fts"][0], short), out, quiet=True)


def test_full_disk_leaves_nothing(llamas, tmp_path, monkeypatch):
    written = {"n": 0}
    real = mio._write_at

    def write(fd, data, offset):
        written["n"] += len(data)
        if written["n"] > 40_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(mio, "_write_at", write)
    out = str(tmp_path / "o")
    with pytest.raises(MergeError, match=r"no space left on the device of .* free at least .* or choose another"):
        merge_checkpoints(ties_config(llamas), out, quiet=True, out_shard_size="30K")
    no_leftovers(out)


def test_interrupt_stops_cleanly_and_resume_finishes(llamas, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mrun._merge_one

    def merge_one(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    whole = str(tmp_path / "whole")
    merge_checkpoints(ties_config(llamas), whole, quiet=True, out_shard_size="30K")
    monkeypatch.setattr(mrun, "_merge_one", merge_one)
    out = str(tmp_path / "o")
    with pytest.raises(MergeInterrupted, match=r"^interrupted: the merge stopped cleanly and .* was not created; the "
                                               r"finished tensors are kept in .*\.o\.partial: rerun with --resume"):
        merge_checkpoints(ties_config(llamas), out, quiet=True, out_shard_size="30K")
    assert not os.path.exists(out) and os.path.isdir(mrun.partial_dir(out))
    # a plain rerun refuses to throw the work away
    monkeypatch.setattr(mrun, "_merge_one", real)
    with pytest.raises(MergeError, match="pass --resume to finish it, or --overwrite to start over"):
        merge_checkpoints(ties_config(llamas), out, quiet=True, out_shard_size="30K")
    # another config does not resume it
    with pytest.raises(MergeError, match="--resume: the partial output .* another config"):
        merge_checkpoints(ties_config(llamas, density=0.3), out, quiet=True, out_shard_size="30K", resume=True)
    # a corrupted tensor of the earlier attempt fails its checksum and is merged again
    log = os.path.join(mrun.partial_dir(out), ".fastmerge", "written-rank0.jsonl")
    first = json.loads(open(log).readline())
    with open(os.path.join(mrun.partial_dir(out), first["shard"]), "r+b") as f:
        f.seek(first["offset"])
        f.write(b"\x7f" * 4)
    merged = []
    monkeypatch.setattr(mrun, "_merge_one", lambda plan, it, *a, **k: merged.append(it.out_name) or real(plan, it, *a, **k))
    res = merge_checkpoints(ties_config(llamas), out, quiet=True, out_shard_size="30K", resume=True)
    assert res.resumed == 3 and first["tensor"] in merged and len(merged) == res.tensors - 3
    assert not os.path.exists(mrun.partial_dir(out))
    assert sorted(os.listdir(out)) == sorted(os.listdir(whole))
    for f in os.listdir(whole):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(whole, f), "rb").read(), f


def test_cli_one_line_errors_progress_and_quiet(llamas, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(ties_config(llamas, 2.0))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "density 2.0" in r.stderr and "Traceback" not in r.stderr
    cfg.write_text(ties_config(llamas))
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(tmp_path / "o"), "--overwrite"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("merged ") and "GB/s" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cfg), str(tmp_path / "o2"), "--dry-run"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "memory needed" in r.stdout and not os.path.exists(tmp_path / "o2")


def test_progress_bar_on_a_terminal(llamas, tmp_path, capsys):
    merge_checkpoints(ties_config(llamas), str(tmp_path / "o"), progress=True)
    err = capsys.readouterr().err
    assert "merging" in err and "tensors" in err and "B/s" in err


def _save(path, tensors, cfg=None):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg or {"architectures": ["Toy"]}, f)
    return path


def test_scalars_integers_and_float64(tmp_path):
    """0-dim tensors, integer buffers (copied from the base) and float64 tensors (the PyTorch formulation,
    which keeps float64) go through every stage."""
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(3):
        paths.append(_save(str(tmp_path / f"m{i}"), {
            "w": torch.randn(3, 4, generator=g), "scale": torch.tensor(1.0 + i), "count": torch.tensor(7, dtype=torch.int64),
            "x64": torch.randn(5, generator=g, dtype=torch.float64)}))
    for method in ("ties", "linear"):
        if method == "ties":
            cfg = (f"merge_method: ties\nbase_model: {paths[0]}\nmodels:\n" +
                   "".join(f"  - model: {p}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for p in paths[1:]))
        else:
            cfg = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}\n"
                                                              for p in paths)
        out, ref = str(tmp_path / f"o_{method}"), str(tmp_path / f"r_{method}")
        merge_checkpoints(cfg, out, quiet=True)
        merge_checkpoints(cfg, ref, quiet=True, reference=True)
        a, b = Checkpoint(out), Checkpoint(ref)
        for n in ("w", "scale", "count", "x64"):
            assert a.get(n).shape == b.get(n).shape and a.get(n).dtype == b.get(n).dtype, n
            assert torch.equal(a.get(n), b.get(n)), (method, n)
            # and the formula worked here in float64 (for float64 both runs take the same PyTorch code)
            if n != "count":
                ins = [Checkpoint(p).get(n).double() for p in paths]
                want = _ties64(ins[0], ins[1:], 0.5) if method == "ties" else sum(ins) / 3
                tol = 1e-15 if n == "x64" else 1e-6
                torch.testing.assert_close(a.get(n).double(), want, rtol=tol, atol=tol, msg=f"{method} {n}")
        assert a.get("count").item() == 7 and a.get("x64").dtype == torch.float64
        assert a.get("scale").shape == ()
        assert a.get("scale").item() == (2.5 if method == "ties" else 2.0)  # scales 1, 2, 3


def _ties64(base, thetas, density):
    """TIES with weights 1, worked entry by entry: each delta keeps its k = max(1, int(density n)) largest
    magnitudes, the sign of the kept sum is elected, and the agreeing kept deltas are averaged."""
    kept = []
    for t in thetas:
        d = (t - base).reshape(-1).tolist()
        k = max(1, int(density * len(d)))
        top = sorted(range(len(d)), key=lambda i: -abs(d[i]))[:k]
        kept.append([d[i] if i in top else 0.0 for i in range(len(d))])
    out = []
    for i in range(len(kept[0])):
        col = [k[i] for k in kept]
        sign = 1.0 if sum(col) >= 0 else -1.0
        agree = [x for x in col if x != 0 and (x > 0) == (sign > 0)]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return base + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_overflow_in_the_fused_pass_is_an_error(tmp_path):
    paths = [_save(str(tmp_path / f"h{i}"), {"w": torch.full((4,), 40000.0, dtype=torch.float16)}) for i in range(2)]
    cfg = ("merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}\n" for p in paths)
           + "parameters: {normalize: false}\n")
    out = str(tmp_path / "o")
    with pytest.raises(MergeError, match=r"tensor w: the merge overflowed to a non-finite value \(finite inputs\)"):
        merge_checkpoints(cfg, out, quiet=True)
    no_leftovers(out)


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_written_tensors_checksum_is_crc32c_and_chains():
    import random
    import zlib

    assert mio.checksum_kind() == "crc32c"
    assert mio.checksum(b"123456789", kind="crc32c") == 0xE3069283  # the standard check value
    rng = random.Random(0)
    for n in [0, 1, 7, 8, 9, 15, 63, 64, 65, 1021, 4099]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        whole = _crc32c_bitwise(data)
        assert mio.checksum(data, kind="crc32c") == whole
        for cut in {0, n // 3, n - 1 if n else 0, n}:
            assert mio.checksum(memoryview(data)[cut:], mio.checksum(data[:cut], kind="crc32c"), kind="crc32c") == whole
        assert mio.checksum(data, kind="crc32") == zlib.crc32(data)
    # past 3 lanes of 8192 bytes the instruction runs three chains at once and combines them
    lanes = 3 * 8192
    for n in [lanes - 1, lanes, lanes + 1, 2 * lanes + 13, 100_003]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        whole = _crc32c_bitwise(data)
        assert mio.checksum(data, kind="crc32c") == whole, n
        for cut in (1, 8191, lanes + 5):
            if cut < n:
                assert mio.checksum(data[cut:], mio.checksum(data[:cut], kind="crc32c"), kind="crc32c") == whole


def test_full_disk_while_reserving_the_shards_leaves_nothing(llamas, tmp_path, monkeypatch):
    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio, "_allocate", full)
    out = str(tmp_path / "o")
    with pytest.raises(MergeError, match=r"no space left on the device of .* free at least"):
        merge_checkpoints(ties_config(llamas), out, quiet=True)
    no_leftovers(out)


def test_a_failed_publish_keeps_everything_for_resume(llamas, tmp_path, monkeypatch):
    real = mrun._publish
    monkeypatch.setattr(mrun, "_publish", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    out = str(tmp_path / "o")
    with pytest.raises(MergeError, match=r"writing .* failed: .*I/O error; the finished tensors are kept in .*--resume"):
        merge_checkpoints(ties_config(llamas), out, quiet=True)
    assert not os.path.exists(out)
    monkeypatch.setattr(mrun, "_publish", real)
    res = merge_checkpoints(ties_config(llamas), out, quiet=True, resume=True)
    assert res.resumed == res.tensors
    assert ".fastmerge" not in os.listdir(out) and not os.path.exists(mrun.partial_dir(out))
    whole = str(tmp_path / "whole")
    merge_checkpoints(ties_config(llamas), whole, quiet=True)
    for f in os.listdir(whole):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(whole, f), "rb").read(), f


def test_interrupt_in_the_global_histogram_passes(llamas, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mrun._job

    def job(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mrun, "_job", job)
    out = str(tmp_path / "o")
    with pytest.raises(MergeInterrupted, match="during the global-TIES histogram passes: nothing was merged yet"):
        merge_checkpoints(ties_config(llamas, extra="parameters: {scope: global}\n"), out, quiet=True)
    no_leftovers(out)


def test_a_missing_tokenizer_source_fails_before_merging(llamas, tmp_path, monkeypatch):
    monkeypatch.setattr(mrun, "_merge_one", lambda *a, **k: pytest.fail("merged before the check"))
    out = str(tmp_path / "o")
    with pytest.raises(CheckpointError, match=r"model \./no-such-tokenizer: not a local folder"):
        merge_checkpoints(ties_config(llamas, extra="tokenizer_source: ./no-such-tokenizer\n"), out, quiet=True)
    no_leftovers(out)


def test_sigterm_outside_the_merge_loop_is_a_clean_interrupt(llamas, tmp_path, monkeypatch):
    """A SIGTERM (raised as KeyboardInterrupt("SIGTERM") by the CLI's handler) that lands in a sync point
    or while the process group closes, not in the merge loop: still a clean, resumable interrupt."""
    from fastmerge.merge.dist import Group

    real = Group.exchange

    def exchange(self, stage, failure, payload=None):
        if stage == "finishing":
            raise KeyboardInterrupt("SIGTERM")
        return real(self, stage, failure, payload)

    monkeypatch.setattr(Group, "exchange", exchange)
    out = str(tmp_path / "o")
    with pytest.raises(MergeInterrupted, match=r"^terminated by SIGTERM: the merge stopped and .* was not created; "
                                               r"finished tensors, if any, are kept in .*: rerun with --resume"):
        merge_checkpoints(ties_config(llamas), out, quiet=True)
    assert not os.path.exists(out) and os.path.isdir(mrun.partial_dir(out))
    monkeypatch.setattr(Group, "exchange", real)
    monkeypatch.setattr(Group, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    with pytest.raises(MergeInterrupted, match=r"^terminated by SIGTERM"):
        merge_checkpoints(ties_config(llamas), str(tmp_path / "o2"), quiet=True)
    monkeypatch.undo()
    res = merge_checkpoints(ties_config(llamas), out, quiet=True, resume=True)
    assert res.resumed == res.tensors


def test_writer_lends_its_buffers_again_once_written(tmp_path):
    """The merge fills buffers that the writer lends (fresh pages per piece would cost more to fault in
    than the merge): a buffer comes back once its bytes are written, and only then, so pieces handed
    over faster than the writer writes them all reach the file intact; a lent buffer that is never
    handed over and a piece larger than a buffer change nothing."""
    from safetensors.torch import load_file

    lend = mio.ShardWriter.LEND // 4
    parts = 12  # more pieces than the queue holds: most are handed over while others still wait
    tensors = [mio.OutTensor("a", torch.float32, (3 * lend - 5,)), mio.OutTensor("b", torch.bfloat16, (7,)),
               mio.OutTensor("c", torch.float32, (2 * lend,)), mio.OutTensor("d", torch.float32, (parts * lend,))]
    layout = mio.ShardLayout(tensors, 1 << 40)
    layout.create(str(tmp_path))
    done = []
    w = mio.ShardWriter(str(tmp_path), layout, on_done=lambda name, crc: done.append((name, crc)))
    want = {"a": torch.randn(3 * lend - 5), "b": torch.randn(7).bfloat16(), "c": torch.randn(2 * lend),
            "d": torch.randn(parts * lend)}
    ptrs = []
    for a, b in [(0, lend), (lend, 2 * lend), (2 * lend, 3 * lend - 5)]:
        piece = w.buffer(b - a, torch.float32)
        ptrs.append(piece.data_ptr())
        piece.copy_(want["a"][a:b])
        w.add_part("a", piece, b == 3 * lend - 5)
        start = time.monotonic()
        while not w._free and time.monotonic() - start < 30:  # until the writer has taken it back
            time.sleep(0.001)
    assert len(set(ptrs)) == 1, "a written buffer was not lent again"
    w.buffer(3, torch.float32).fill_(float("nan"))  # lent, never handed over
    small = w.buffer(7, torch.bfloat16)
    small.copy_(want["b"])
    w.add_part("b", small, True)
    big = w.buffer(2 * lend, torch.float32)  # over one buffer: memory of its own
    big.copy_(want["c"])
    w.add_part("c", big, True)
    for k in range(parts):  # no waiting: a buffer lent again before it was written would corrupt "d"
        piece = w.buffer(lend, torch.float32)
        piece.copy_(want["d"][k * lend:(k + 1) * lend])
        w.add_part("d", piece, k == parts - 1)
    w.finish()
    assert [name for name, _ in done] == ["a", "b", "c", "d"]
    got = load_file(os.path.join(str(tmp_path), layout.names[0]))
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    for name, crc in done:  # the checksums recorded as the pieces went out are those of the file
        assert crc == layout.checksum(str(tmp_path), name, w.kind), name


@pytest.mark.parametrize("enabled", [True, False])
def test_importing_leaves_the_collector_as_it_was(enabled):
    """The package pauses the garbage collector while it imports torch, and leaves it as it found it."""
    code = (f"import gc\n{'' if enabled else 'gc.disable()'}\nimport fastmerge\n"
            f"assert gc.isenabled() is {enabled}, gc.isenabled()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "linear", "ties_global"])
def test_memory_budget_and_read_ahead_leave_the_bytes_unchanged(llamas, tmp_path, monkeypatch, method):
    """The memory budget decides whether a tensor stays mapped through its passes (one-pass selection)
    or is read chunk by chunk; the read-ahead threads only warm the page cache. Neither changes a byte of
    the output: tensors of several chunks (chunks of 512 entries here) merged under a budget that holds
    them, under one that holds none, and with no read-ahead, give the same files."""
    from fastmerge.merge import methods as M
    from fastmerge.merge import select as S

    monkeypatch.setattr(M, "CHUNK", 512)
    monkeypatch.setattr(S, "SAMPLE_FROM", 1024)
    fts = llamas["fts"]
    if method == "linear":
        cfg = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters: {{weight: {1 + i}}}\n"
                                                          for i, p in enumerate([llamas["base"]] + fts))
    else:
        m = "ties" if method == "ties_global" else method
        cfg = (f"merge_method: {m}\nbase_model: {llamas['base']}\nmodels:\n"
               + "".join(f"  - model: {p}\n    parameters: {{weight: {1 - 0.2 * i}, density: {0.4 + 0.1 * i}}}\n"
                         for i, p in enumerate(fts))
               + ("parameters: {scope: global, gamma: 0.05}\n" if method == "ties_global" else
                  "parameters: {gamma: 0.05}\n" if "breadcrumbs" in m else ""))
    windows = []
    real = mrun._merge_one
    monkeypatch.setattr(mrun, "_merge_one", lambda *a: windows.append(a[-1]) or real(*a))
    outs = {}
    for label, kw in (("budget", dict(max_memory="8G")), ("none", dict(max_memory="1")),
                      ("no readers", dict(max_memory="8G", readers=0))):
        out = str(tmp_path / label.replace(" ", "_"))
        windows.clear()
        res = merge_checkpoints(cfg, out, quiet=True, **kw)
        assert windows and (min(windows) > 10 ** 9 if label != "none" else max(windows) == 0), (label, windows)
        assert res.storage_read is None or res.storage_read >= 0
        outs[label] = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".safetensors")}
    assert outs["budget"] == outs["none"] == outs["no readers"]


def test_read_order_covers_every_input_byte_once(llamas, monkeypatch):
    """The read-ahead's order: every input byte of the plan once, each tensor chunk by chunk with its
    models side by side, and the items' ends ascending to the total."""
    from fastmerge.merge import methods as M
    from fastmerge.merge.config import load_config
    from fastmerge.merge.plan import build_plan

    monkeypatch.setattr(M, "CHUNK", 1000)
    plan = build_plan(load_config(ties_config(llamas)))
    try:
        items = list(plan.items)
        segs, ends = mrun._read_order(plan, items)
        assert ends[-1] == sum(n for _, _, n in segs) == plan.in_bytes
        assert all(a <= b for a, b in zip(ends, ends[1:]))
        spans = {}
        for f, off, n in segs:
            spans.setdefault(f, []).append((off, off + n))
        for f, s in spans.items():
            s.sort()
            assert all(b <= c for (_, b), (c, _) in zip(s, s[1:])), f  # no byte twice
        big = max(items, key=lambda it: it.in_bytes)
        infos = [plan.checkpoints[m].tensors[n] for m, n in [big.base] + big.inputs]
        mine = mrun._read_order(plan, [big])[0]
        size = infos[0].dtype.itemsize
        # the first chunk of every model, then the second chunk of every model, ...
        assert mine[:len(infos)] == [(i.file, i.start, 1000 * size) for i in infos]
        assert mine[len(infos):2 * len(infos)] == [(i.file, i.start + 1000 * size, min(1000, i.numel - 1000) * size)
                                                   for i in infos]
    finally:
        plan.close()


def test_summary_counts_what_was_read_from_storage(llamas, tmp_path):
    res = merge_checkpoints(ties_config(llamas), str(tmp_path / "o"), quiet=True)
    text = res.summary()
    if res.storage_read is None:
        pytest.skip("this kernel does not count read_bytes in /proc/self/io")
    assert f"{res.storage_read / 1e9:.2f} GB read from storage" in text
    assert res.ranks[0]["storage_read"] == res.storage_read
