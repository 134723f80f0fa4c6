"""MIMA: data, heads, the loop, resuming, the distributed run and the reports."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cache_with_builtin
import fastmerge
from fastmerge import models, reference
from fastmerge.data import BUILTIN_TASKS, builtin_suite, builtin_task, check_root, load_paper_dataset
from fastmerge.flat import FlatLayout
from fastmerge.mima import MimaConfig, _Stopped, error_landscape, lr_at, run_mima

SMALL = {"train": 96, "val": 24, "test": 36}
TASKS3 = ["shapes", "colors", "digits"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMERGE_CACHE", cache_with_builtin(tmp_path / "cache"))


def small_cfg(out, **kw):
    base = dict(iterations=(1, 2), tasks=TASKS3, steps=8, batch_size=16, builtin_sizes=SMALL, out=str(out),
                progress=False, landscape_grid=3, landscape_limit=24)
    base.update(kw)
    return MimaConfig(**base)


# ----------------------------------------------------------------------------------- data

def test_builtin_suite_is_deterministic_and_well_formed():
    a = builtin_suite(seed=3, sizes=SMALL)
    b = builtin_suite(seed=3, sizes=SMALL)
    c = builtin_task("shapes", seed=4, sizes=SMALL)
    assert [t.name for t in a] == list(BUILTIN_TASKS) and len(a) >= 7
    for ta, tb in zip(a, b):
        for split in ("train", "val", "test"):
            assert torch.equal(ta.splits[split].images, tb.splits[split].images)
            assert torch.equal(ta.splits[split].labels, tb.splits[split].labels)
            labels = ta.splits[split].labels
            assert labels.min() >= 0 and labels.max() < ta.num_classes
        assert ta.splits["train"].images.shape[1:] == (3, 16, 16)
        assert all("{}" in tpl for tpl in ta.templates)
    assert not torch.equal(a[0].splits["train"].images, c.splits["train"].images)
    # every class appears in every split of the generated tasks
    for t in a[:-1]:
        assert t.splits["test"].labels.unique().numel() == t.num_classes


def test_digits_is_real_data_with_disjoint_stratified_splits():
    d = builtin_task("digits")
    n = {s: d.size(s) for s in ("train", "val", "test")}
    assert sum(n.values()) == 1797  # scikit-learn's bundled handwritten digits
    flat = {s: d.splits[s].images.flatten(1) for s in n}
    # no image is shared between train and test (the dataset has no exact duplicates across them)
    tr = {bytes(x.numpy()) for x in flat["train"]}
    assert sum(bytes(x.numpy()) in tr for x in flat["test"]) <= 2
    for s in n:
        counts = torch.bincount(d.splits[s].labels, minlength=10).float()
        assert counts.min() > 0.7 * counts.mean()


def test_unknown_builtin_task():
    with pytest.raises(ValueError, match="unknown built-in task 'nope'"):
        builtin_task("nope")


def _image_tree(root: Path, splits, classes=("a_b", "c"), per_class=6):
    from PIL import Image

    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (10 * i, 50 * ci, 0)).save(d / f"{i}.png")


def test_paper_dataset_from_folders_carves_validation(tmp_path):
    _image_tree(tmp_path / "eurosat", ["train", "test"], per_class=20)
    import torchvision.transforms as Tr

    task = load_paper_dataset("EuroSAT", tmp_path, transform=Tr.ToTensor())
    assert task.classnames == ("a b", "c")
    n_train, n_val = task.size("train"), task.size("val")
    assert n_train + n_val == 40 and n_val == 20  # the paper's 2700 capped at half of train
    val_labels = [task.splits["val"][i][1] for i in range(n_val)]
    assert val_labels.count(0) == val_labels.count(1)  # stratified
    images, labels = next(task.eval_batches("test", batch_size=8))
    assert images.shape == (8, 3, 8, 8) and labels.shape == (8,)


def test_paper_dataset_uses_val_folder_and_classnames_file(tmp_path):
    _image_tree(tmp_path / "dtd", ["train", "val", "test"])
    (tmp_path / "dtd" / "classnames.txt").write_text("banded\ncrosshatched\n")
    task = load_paper_dataset("DTD", tmp_path)
    assert task.classnames == ("banded", "crosshatched")
    assert task.size("val") == 12


def test_paper_dataset_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*cars"):
        load_paper_dataset("Cars", tmp_path)
    (tmp_path / "svhn" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"svhn/test"):
        check_root(tmp_path, ["SVHN"])
    with pytest.raises(ValueError, match="unknown dataset"):
        check_root(tmp_path, ["ImageNet"])


# ----------------------------------------------------------------------------------- models and heads

def test_zeroshot_head_is_built_from_the_text_tower_and_cached(tmp_path):
    clip, _, tok = models.load_clip(models.TINY, seed=1)
    task = builtin_task("shapes", sizes=SMALL)
    head = models.zeroshot_head(clip, tok, task.classnames, task.templates)
    assert head.shape == (6, 64)
    norms = head.norm(dim=1)
    assert torch.allclose(norms, clip.logit_scale.exp().detach().expand(6), rtol=1e-5)
    # by hand: mean of normalised prompt embeddings, normalised
    with torch.no_grad():
        e = torch.nn.functional.normalize(clip.encode_text(tok([t.format("ring") for t in task.templates])), dim=-1)
        want = torch.nn.functional.normalize(e.mean(0), dim=0) * clip.logit_scale.exp()
    assert torch.allclose(head[SHAPES_INDEX["ring"]], want, atol=1e-5)
    files = list((tmp_path / "cache" / "heads").glob("*.pt"))
    assert len(files) == 1
    assert torch.equal(models.zeroshot_head(clip, tok, task.classnames, task.templates), head)
    other, _, _ = models.load_clip(models.TINY, seed=2)
    models.zeroshot_head(other, tok, task.classnames, task.templates)
    assert len(list((tmp_path / "cache" / "heads").glob("*.pt"))) == 2  # keyed by the text tower's weights
    with pytest.raises(ValueError, match="'{}'"):
        models.zeroshot_head(clip, tok, ["x"], ["no placeholder"])


SHAPES_INDEX = {n: i for i, n in enumerate(builtin_task("shapes", sizes={"train": 0, "val": 0, "test": 0}).classnames)}


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        models.load_clip("ViT-Nope-1")


# ----------------------------------------------------------------------------------- schedule and config

def test_lr_schedule_warmup_then_cosine():
    cfg = MimaConfig(iterations=(1, 4), steps=100, lr=1.0, warmup=10).resolved()
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[9:], lrs[10:]))
    # after the 10 warm-up steps, 90 cosine steps: step 55 is half-way (0.5); the last step, 89/90 of the
    # way, is 0.5 (1 + cos(178°)) = 0.5 (1 - cos 2°) = sin²(1°)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=1e-12)
    assert lrs[99] == pytest.approx(0.017452406437283512 ** 2, rel=1e-12)
    assert MimaConfig(steps=480).resolved().warmup == 48


@pytest.mark.parametrize("kw,msg", [
    (dict(iterations=(3,), steps=8), "not divisible by N = 3"),
    (dict(iterations=(0,)), "positive"),
    (dict(iterations=(1,), warmup=8, steps=8), "warmup"),
    (dict(iterations=(1,), landscape=("shapes", "shapes")), "two different"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MimaConfig(**kw).resolved()


# ----------------------------------------------------------------------------------- the loop

def _cosines_by_hand(vectors: torch.Tensor) -> list:
    """T x T cosines of the rows of ``vectors``, in float64."""
    v = vectors.double()
    n = v.norm(dim=1)
    return (v @ v.t() / (n[:, None] * n[None, :])).tolist()


def _builtin_theta0() -> torch.Tensor:
    """θ0 of the built-in suite: the image encoder's parameters of the cached built-in CLIP, in order."""
    clip = models.load_clip(models.TINY, "builtin")[0]
    return torch.cat([p.detach().flatten() for p in clip.visual.parameters()])


def test_mima_run_records_reports_and_checkpoints(tmp_path, monkeypatch):
    # keep the inputs of every cosine call: (base, task models) of each iteration, for the checks below
    calls = []
    real_cosine = fastmerge.task_vector_cosine
    monkeypatch.setattr(fastmerge, "task_vector_cosine",
                        lambda base, thetas, **kw: calls.append((base.clone(), thetas.clone())) or
                        real_cosine(base, thetas, **kw))
    res = run_mima(small_cfg(tmp_path / "run"), log=lambda _m: None)
    monkeypatch.undo()
    assert set(res["runs"]) == {"1", "2"}
    r1, r2 = res["runs"]["1"], res["runs"]["2"]
    assert [it["iteration"] for it in r2["iterations"]] == [1, 2] and r2["K"] == 4
    out = tmp_path / "run"
    load = lambda path: FlatLayout.load_safetensors(path)[1]
    task_models = {n: torch.stack([load(out / f"N{n}" / "checkpoints" / f"task-{t}.safetensors") for t in TASKS3])
                   for n in ("1", "2")}
    theta0 = _builtin_theta0()
    # two calls per iteration (τ: against θ0; δ: against the average the iteration started from), in order
    # N = 1 (iteration 1), then N = 2 (iterations 1 and 2); the last iteration's models are the checkpoints
    assert len(calls) == 6
    assert all(torch.equal(base, theta0) for base, _ in calls[:5])
    assert all(torch.equal(calls[i][1], calls[i + 1][1]) for i in (0, 2, 4))
    assert torch.equal(calls[0][1], task_models["1"]) and torch.equal(calls[4][1], task_models["2"])
    first_models = calls[2][1]                     # N = 2 after iteration 1
    theta_bar = first_models.double().mean(0)
    torch.testing.assert_close(calls[5][0].double(), theta_bar, rtol=0, atol=1e-6)
    # the recorded cosines against cosines worked out here in float64
    close = lambda got, want, tol: torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                                              torch.tensor(want, dtype=torch.float64), rtol=0, atol=tol)
    it = r1["iterations"][0]                       # N = 1: θ̄ = θ0, so δ = τ
    tau = _cosines_by_hand(task_models["1"] - theta0)
    close(it["cos_tau"], tau, 1e-9)
    close(it["cos_delta"], tau, 1e-9)
    it1, it2 = r2["iterations"]
    tau1 = _cosines_by_hand(first_models - theta0)
    close(it1["cos_tau"], tau1, 1e-9)
    close(it1["cos_delta"], tau1, 1e-9)            # iteration 1 of N = 2 trains from θ0 too
    close(it2["cos_tau"], _cosines_by_hand(task_models["2"] - theta0), 1e-9)
    delta2 = _cosines_by_hand(task_models["2"].double() - theta_bar)
    close(it2["cos_delta"], delta2, 1e-5)          # against the average of iteration 1
    assert max(abs(a - b) for ra, rb in zip(delta2, it2["cos_tau"]) for a, b in zip(ra, rb)) > 1e-2
    for key in ("uniform", "task_arithmetic", "ties", "task_arithmetic_no_val", "ties_no_val"):
        m = r2["final"]["merges"][key]
        assert len(m["test_acc"]) == 3 and 0 <= m["abs"] <= 100
    # the merged checkpoints against the merges written out (task arithmetic) or the reference twin (TIES)
    ck = out / "N2" / "checkpoints"
    thetas = task_models["2"]
    merges = r2["final"]["merges"]
    torch.testing.assert_close(load(ck / "merge-uniform.safetensors").double(), thetas.double().mean(0),
                               rtol=0, atol=1e-6)
    tau_sum = (thetas.double() - theta0.double()).sum(0)
    for key in ("task_arithmetic", "task_arithmetic_no_val"):
        lam = merges[key]["lam"]
        torch.testing.assert_close(load(ck / f"merge-{key}.safetensors").double(), theta0.double() + lam * tau_sum,
                                   rtol=0, atol=1e-6)
    assert merges["task_arithmetic_no_val"]["lam"] == 0.4 and merges["ties_no_val"]["lam"] == 1.0
    assert merges["task_arithmetic"]["lam"] in [round(0.05 * i, 2) for i in range(21)]
    for key in ("ties", "ties_no_val"):
        want = reference.merge_ties(theta0, list(thetas), density=0.2, lam=merges[key]["lam"])
        torch.testing.assert_close(load(ck / f"merge-{key}.safetensors"), want, rtol=0, atol=1e-6)
    for f in ("results.json", "report.md", "plots/cosine_boxplots.png", "plots/accuracy_vs_N.png",
              "plots/error_landscape.png", "N1/result.json"):
        assert (out / f).is_file(), f
    assert "Uniform Averaging" in (out / "report.md").read_text()
    assert not (out / "N2" / "state-rank0.pt").exists()  # resume state is dropped once a run finishes
    assert "landscape" in r2 and len(r2["landscape"]["error"][2]) == 3
    with pytest.raises(FileExistsError, match=f"{re.escape(str(out))} already holds a run; pass --resume to continue "
                                              "it or choose another --out"):
        run_mima(small_cfg(tmp_path / "run"), log=lambda _m: None)


def test_resume_after_stop_matches_uninterrupted(tmp_path):
    cfg = small_cfg(tmp_path / "a", iterations=(4,), landscape=None, checkpoints=True)
    full = run_mima(cfg, log=lambda _m: None)
    cfg_b = small_cfg(tmp_path / "b", iterations=(4,), landscape=None, checkpoints=True)
    with pytest.raises(_Stopped, match="stopped after iteration 2 as asked") as stopped:
        run_mima(cfg_b, log=lambda _m: None, stop_after=2)
    assert stopped.value.iteration == 2
    assert (tmp_path / "b" / "N4" / "state-rank0.pt").is_file()
    with pytest.raises(ValueError, match="different settings"):
        run_mima(small_cfg(tmp_path / "b", iterations=(4,), landscape=None, lr=1e-4), resume=True, log=lambda _m: None)
    resumed = run_mima(cfg_b, resume=True, log=lambda _m: None)
    a, b = full["runs"]["4"], resumed["runs"]["4"]
    strip = lambda its: [{k: v for k, v in it.items() if not k.startswith("seconds")} for it in its]
    assert strip(a["iterations"]) == strip(b["iterations"])
    assert a["final"]["merges"] == b["final"]["merges"]
    for n in TASKS3:
        pa = FlatLayout.load_safetensors(tmp_path / "a" / "N4" / "checkpoints" / f"task-{n}.safetensors")[1]
        pb = FlatLayout.load_safetensors(tmp_path / "b" / "N4" / "checkpoints" / f"task-{n}.safetensors")[1]
        assert torch.equal(pa, pb)


def _cli(args, out, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastmerge", "mima", "--out", str(out), "--tasks", "shapes", "digits",
           "--no-progress", "--no-landscape", "--threads", "1", "--eval-limit", "60", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_cli_resume_after_kill_matches_uninterrupted(tmp_path):
    """A run killed (SIGKILL) mid-way continues with --resume and ends exactly as an uninterrupted one."""
    args = ["-N", "4", "--steps", "160", "--batch-size", "16", "--seed", "5"]
    ref = _cli(args, tmp_path / "ref")
    out_ref, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out_ref
    state = tmp_path / "run" / "N4" / "state-rank0.pt"
    proc = _cli(args, tmp_path / "run")
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp_path / "run" / "N4" / "result.json").exists(), "the run finished before it could be killed"
    done = torch.load(state, weights_only=False)["iteration"]
    assert 1 <= done < 4
    res = _cli(args + ["--resume"], tmp_path / "run")
    out_res, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out_res
    assert f"resuming after iteration {done} of 4" in out_res
    a = json.loads((tmp_path / "ref" / "N4" / "result.json").read_text())
    b = json.loads((tmp_path / "run" / "N4" / "result.json").read_text())
    assert a["final"]["merges"] == b["final"]["merges"]
    assert [it["cos_tau"] for it in a["iterations"]] == [it["cos_tau"] for it in b["iterations"]]
    for n in ("shapes", "digits"):
        pa = FlatLayout.load_safetensors(tmp_path / "ref" / "N4" / "checkpoints" / f"task-{n}.safetensors")[1]
        pb = FlatLayout.load_safetensors(tmp_path / "run" / "N4" / "checkpoints" / f"task-{n}.safetensors")[1]
        assert torch.equal(pa, pb)


def test_cli_errors_are_clear(tmp_path):
    p = _cli(["-N", "3", "--steps", "8"], tmp_path / "x")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "not divisible by N = 3" in out
    p = _cli(["--data-root", str(tmp_path / "nowhere"), "--tasks", "MNIST"], tmp_path / "y")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "mnist" in out and "does not download" in out


def _one_process_and_two_ranks(common: list, tmp_path) -> subprocess.CompletedProcess:
    """Run ``python <common>`` in one process (into tmp/one) and under torchrun with 2 gloo ranks (into
    tmp/two); both must succeed. Returns the torchrun run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, *common, "--threads", "1", "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    return multi


def test_distributed_two_processes_match_single_process(tmp_path):
    """torchrun with 2 gloo processes on loopback: the same task models and merges as one process.

    Tasks go to ranks in contiguous blocks ([shapes, colors] and [digits]), so rank 0's partial sum is
    the prefix of the task-order sum and the all_reduce adds the last task: the average is bitwise
    the single-process one, and so is everything after it.
    """
    common = ["-m", "fastmerge", "mima", "-N", "1", "2", "--steps", "16", "--batch-size", "16", "--tasks", *TASKS3,
              "--no-progress", "--no-landscape", "--eval-limit", "60"]
    _one_process_and_two_ranks(common, tmp_path)
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for n in ("1", "2"):
        assert a["runs"][n]["final"]["merges"] == b["runs"][n]["final"]["merges"]
        assert [it["cos_tau"] for it in a["runs"][n]["iterations"]] == [it["cos_tau"] for it in b["runs"][n]["iterations"]]
        for f in ["task-shapes", "task-colors", "task-digits", "merge-uniform", "merge-ties"]:
            pa = FlatLayout.load_safetensors(tmp_path / "one" / f"N{n}" / "checkpoints" / f"{f}.safetensors")[1]
            pb = FlatLayout.load_safetensors(tmp_path / "two" / f"N{n}" / "checkpoints" / f"{f}.safetensors")[1]
            assert torch.equal(pa, pb), (n, f)


def test_distributed_seeds_share_one_process_group(tmp_path):
    """``--seeds 2`` under torchrun: one process group for both seeds, and the single-process results."""
    common = ["-m", "fastmerge", "mima", "-N", "2", "--steps", "8", "--batch-size", "16", "--tasks", "shapes", "digits",
              "--no-progress", "--no-landscape", "--no-checkpoints", "--eval-limit", "40", "--seeds", "2"]
    multi = _one_process_and_two_ranks(common, tmp_path)
    assert multi.stdout.count("=== seed") == 2          # rank 0 only
    for s in ("seed-0", "seed-1"):
        a = json.loads((tmp_path / "one" / s / "results.json").read_text())
        b = json.loads((tmp_path / "two" / s / "results.json").read_text())
        assert b["world_size"] == 2 and a["runs"]["2"]["final"]["merges"] == b["runs"]["2"]["final"]["merges"]
    tables = [json.loads((tmp_path / d / "summary.json").read_text())["table"].splitlines() for d in ("one", "two")]
    assert [r for r in tables[0] if "wall time" not in r] == [r for r in tables[1] if "wall time" not in r]


def test_error_landscape_geometry(tmp_path):
    from fastmerge.mima import Evaluator, build_suite

    cfg = small_cfg(tmp_path, landscape=None).resolved()
    suite = build_suite(cfg, log=lambda _m: None)
    g = torch.Generator().manual_seed(0)
    th0 = suite.theta0
    thetas = torch.stack([th0 + 0.01 * torch.randn(th0.shape, generator=g) for _ in range(3)])
    ev = Evaluator(suite)
    L = error_landscape(suite, ev, thetas, 0, 1, grid=3, limit=12)
    ta, tb = thetas[0].double() - th0.double(), thetas[1].double() - th0.double()
    # the plane's basis built here: u along τ_a, v the unit part of τ_b orthogonal to u
    u = ta / ta.norm()
    v = tb - (tb @ u) * u
    v = v / v.norm()
    assert L["theta_a"][0] == pytest.approx(float(ta.norm()), rel=1e-9) and abs(L["theta_a"][1]) < 1e-9
    assert math.hypot(*L["theta_b"]) == pytest.approx(float(tb.norm()), rel=1e-9)
    xb, yb = L["theta_b"]
    torch.testing.assert_close(th0.double() + xb * u + yb * v, thetas[1].double(), rtol=0, atol=1e-9)
    # the grid: the three points' box, widened by a quarter of its larger side on each side
    xs_pts, ys_pts = [0.0, float(ta.norm()), xb], [0.0, 0.0, yb]
    span = max(max(xs_pts) - min(xs_pts), max(ys_pts) - min(ys_pts))
    want_x = [min(xs_pts) - span / 4, (min(xs_pts) + max(xs_pts)) / 2, max(xs_pts) + span / 4]
    want_y = [min(ys_pts) - span / 4, (min(ys_pts) + max(ys_pts)) / 2, max(ys_pts) + span / 4]
    assert L["x"] == pytest.approx(want_x, rel=1e-6) and L["y"] == pytest.approx(want_y, rel=1e-6)
    err = torch.tensor(L["error"])
    assert err.shape == (3, 3, 3)
    # two opposite corners evaluated here: row iy is y, column ix is x
    for iy, ix in ((0, 2), (2, 0)):
        theta = (th0.double() + want_x[ix] * u + want_y[iy] * v).float()
        ea, eb = (100.0 - ev.accuracy(theta, t, "test", 12) for t in (0, 1))
        assert err[:, iy, ix].tolist() == pytest.approx([ea, eb, (ea + eb) / 2], abs=1e-4)


def test_distributed_resume_when_ranks_stopped_one_iteration_apart(tmp_path):
    """A kill between the two ranks' saves leaves them an iteration apart; --resume restarts both from
    the older one and ends exactly as an uninterrupted run."""
    common = ["-m", "fastmerge", "mima", "-N", "4", "--steps", "16", "--batch-size", "16", "--tasks", *TASKS3,
              "--no-progress", "--no-landscape", "--eval-limit", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    single = subprocess.run([sys.executable, *common, "--threads", "1", "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    out = tmp_path / "two"
    first = subprocess.run([*torchrun, *common, "--out", str(out), "--stop-after", "2"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode != 0 and "stopped after iteration 2" in first.stdout + first.stderr
    run = out / "N4"
    assert torch.load(run / "state-rank1.pt", weights_only=False)["iteration"] == 2
    os.replace(run / "state-rank1.prev.pt", run / "state-rank1.pt")   # rank 1 "died" before its save
    again = subprocess.run([*torchrun, *common, "--out", str(out), "--resume"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming after iteration 1 of 4" in again.stdout + again.stderr
    for f in ["task-shapes", "task-colors", "task-digits", "merge-uniform"]:
        a = FlatLayout.load_safetensors(tmp_path / "one" / "N4" / "checkpoints" / f"{f}.safetensors")[1]
        b = FlatLayout.load_safetensors(run / "checkpoints" / f"{f}.safetensors")[1]
        assert torch.equal(a, b), f


def test_eval_limit_samples_across_classes(tmp_path):
    _image_tree(tmp_path / "mnist", ["train", "test"], classes=("0", "1", "2", "3"), per_class=10)
    import torchvision.transforms as Tr

    task = load_paper_dataset("MNIST", tmp_path, transform=Tr.ToTensor())
    labels = torch.cat([y for _, y in task.eval_batches("test", batch_size=4, limit=12)])
    assert labels.numel() == 12 and labels.unique().numel() >= 3   # not just the first class folders


def test_paper_dataset_class_folders_must_match(tmp_path):
    _image_tree(tmp_path / "gtsrb", ["train"], classes=("a", "b"))
    _image_tree(tmp_path / "gtsrb", ["test"], classes=("a",))
    with pytest.raises(ValueError, match="class folders .* differ"):
        load_paper_dataset("GTSRB", tmp_path)


def test_mean_std():
    from fastmerge.report import mean_std, pm

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert pm([1.0, 2.0, 3.0]) == "2.0 ± 1.0"


def test_seeds_report_mean_and_std_over_seed_runs(tmp_path):
    from fastmerge.mima import run_mima_seeds

    kw = dict(iterations=(1, 2), landscape=None, checkpoints=False)
    res = run_mima_seeds(small_cfg(tmp_path / "s", **kw), seeds=2, log=lambda _m: None)
    assert res["seeds"] == [0, 1]
    r0, r1 = res["results"]
    assert r0["config"]["seed"] == 0 and r1["config"]["seed"] == 1
    # each seed's run is the single-seed run with that seed
    one = run_mima(small_cfg(tmp_path / "one", seed=1, **kw), log=lambda _m: None)
    assert one["runs"]["2"]["final"]["merges"]["uniform"]["abs"] == r1["runs"]["2"]["final"]["merges"]["uniform"]["abs"]
    assert one["runs"]["2"]["final"]["cos_tau"] == r1["runs"]["2"]["final"]["cos_tau"]
    md = (tmp_path / "s" / "report.md").read_text()
    # two seeds a, b: mean (a + b) / 2 and sample standard deviation |a - b| / sqrt(2), formatted here
    by_hand = lambda a, b, digits: f"{(a + b) / 2:.{digits}f} ± {abs(a - b) / math.sqrt(2):.{digits}f}"
    for n in ("1", "2"):
        uni = [r["runs"][n]["final"]["merges"]["uniform"]["abs"] for r in res["results"]]
        assert by_hand(*uni, 1) in md
        cos = [r["runs"][n]["final"]["median_cos_tau"] for r in res["results"]]
        assert by_hand(*cos, 3) in md
    for f in ("summary.json", "plots/accuracy_vs_N_seeds.png", "seed-0/report.md", "seed-1/results.json"):
        assert (tmp_path / "s" / f).is_file(), f
    with pytest.raises(ValueError, match="at least 1"):
        run_mima_seeds(small_cfg(tmp_path / "z"), seeds=0)
