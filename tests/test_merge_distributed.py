"""``fastmerge merge`` under ``torchrun`` (gloo, one host): any number of ranks writes the same files as
one process, global-scope TIES all-reduces histograms only, and a failing, killed or stuck rank stops
the whole job cleanly, after which ``--resume`` finishes it identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmerge._ops import _C
from fastmerge.merge import merge_checkpoints
from fastmerge.merge.dist import partition
from fastmerge.merge.run import partial_dir

safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(_C is None or not torch.distributed.is_available(),
                                reason="needs the compiled extension and torch.distributed")

WORKER = os.path.join(os.path.dirname(__file__), "dist_merge_worker.py")
SHAPES = {"embed.weight": (97, 24), "layers.0.attn.weight": (24, 24), "layers.0.norm.weight": (24,),
          "layers.0.mlp.weight": (61, 24), "layers.1.attn.weight": (24, 24), "layers.1.norm.weight": (24,),
          "layers.1.mlp.weight": (61, 24), "big.weight": (70001,), "tiny.bias": (1,), "head.weight": (97, 24)}
MODELS = 4  # fine-tunes besides the base


def _save(folder, tensors):
    os.makedirs(folder, exist_ok=True)
    safetensors_torch.save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["ToyForCausalLM"], "model_type": "toy", "torch_dtype": "float32"}, f)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["position_ids"] = torch.arange(64, dtype=torch.int64)
    _save(str(root / "base"), base)
    fts = []
    for i in range(MODELS):
        sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        sd["tiny.bias"] = base["tiny.bias"] + 0.5 * (i % 2)  # exact ties between models
        _save(str(root / f"ft{i}"), sd)
        fts.append(str(root / f"ft{i}"))
    bad = {k: v.clone() for k, v in safetensors_torch.load_file(os.path.join(fts[1], "model.safetensors")).items()}
    bad["head.weight"][5, 3] = float("nan")  # the last tensor of the plan: merged by the last rank
    _save(str(root / "bad"), bad)
    return {"root": root, "base": str(root / "base"), "fts": fts, "bad": str(root / "bad")}


def config(toys, method, extra="", fts=None):
    fts = fts or toys["fts"]
    params = {"linear": "weight: {w}", "ties": "weight: {w}, density: 0.4", "dare_ties": "weight: {w}, density: 0.5"}
    models = "\n".join(f"  - model: {p}\n    parameters: {{{params[method].format(w=1 - 0.1 * i)}}}"
                       for i, p in enumerate(fts))
    base = f"base_model: {toys['base']}\n" if method != "linear" else f"  - model: {toys['base']}\n    parameters: {{weight: 0.5}}\n"
    if method == "linear":
        return f"merge_method: linear\nmodels:\n{base}{models}\n{extra}"
    return f"merge_method: {method}\n{base}models:\n{models}\n{extra}"


CONFIGS = {
    "linear": lambda t: config(t, "linear"),
    "ties": lambda t: config(t, "ties"),
    "ties_global": lambda t: config(t, "ties", "parameters: {scope: global}\n"),
    "dare_ties": lambda t: config(t, "dare_ties"),
}
OPTIONS = {"out_shard_size": "100K", "random_seed": 7}


def child_env(**extra):
    """The environment of the processes the tests start: they import the fastmerge that this test
    imported, wherever the installed one points."""
    import fastmerge

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastmerge.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path, **extra)


def torchrun(nproc, args, timeout=300, extra_env=None):
    env = child_env(OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor-interval=0.2"] + args
    # a session of its own, so that a job that outlives the timeout is killed with all of its ranks
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_worker(tmp_path, nproc, jobs, fault=None, name="w", timeout=300, init_group=False):
    results = tmp_path / f"{name}-results"
    results.mkdir()
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"jobs": jobs, "fault": fault, "results": str(results), "init_group": init_group}))
    r = torchrun(nproc, [WORKER, str(spec)], timeout=timeout)
    per_rank = {}
    for f in os.listdir(results):
        with open(results / f) as fh:
            per_rank[int(f.split("-")[1].split(".")[0])] = json.load(fh)
    return r, per_rank


def same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in os.listdir(a):
        with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
            assert x.read() == y.read(), f"{f} differs between {a} and {b}"


@pytest.fixture(scope="module")
def single(toys, tmp_path_factory):
    """One process, no torchrun: the outputs every rank count must reproduce."""
    root = tmp_path_factory.mktemp("single")
    outs = {}
    for name, cfg in CONFIGS.items():
        outs[name] = str(root / name)
        res = merge_checkpoints(cfg(toys), outs[name], quiet=True, **OPTIONS)
        assert res.world == 1 and len(res.shards) > 2  # several shards, so ranks share some of them
    return outs


def test_partition_is_contiguous_and_balanced():
    for sizes, parts in [([5] * 10, 3), ([1, 100, 1, 1, 1, 100, 1], 2), ([0, 0, 0], 2), ([7], 3), ([3, 1], 5)]:
        rs = partition(sizes, parts)
        assert len(rs) == parts and rs[0].start == 0 and rs[-1].stop == len(sizes)
        assert all(a.stop == b.start for a, b in zip(rs, rs[1:]))
        total = sum(sizes)
        for r in rs:  # each part within one item of its share
            assert abs(sum(sizes[i] for i in r) - total / parts) <= max(sizes) + 1e-9
    assert [len(r) for r in partition([1] * 9, 3)] == [3, 3, 3]


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_any_rank_count_writes_the_same_files(toys, single, tmp_path, nproc):
    jobs = [{"config": cfg(toys), "out": str(tmp_path / name), "options": OPTIONS} for name, cfg in CONFIGS.items()]
    r, res = run_worker(tmp_path, nproc, jobs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(res) == list(range(nproc))
    for name in CONFIGS:
        same_files(single[name], str(tmp_path / name))
    for k, name in enumerate(CONFIGS):
        ranks = res[0][k]["ranks"]
        assert res[0][k]["world"] == nproc and len(ranks) == nproc
        assert sum(x["tensors"] for x in ranks) == len(SHAPES) + 1
        if nproc > 1:
            assert all(x["tensors"] > 0 for x in ranks)
        # global TIES all-reduces two passes of models x 65536 int64 counts per rank, whatever the size
        expect = 2 * MODELS * 65536 * 8 if (name == "ties_global" and nproc > 1) else 0
        assert [x["bytes_all_reduced"] for x in ranks] == [expect] * nproc


def test_a_process_group_of_the_caller_is_used_and_left_alone(toys, single, tmp_path):
    jobs = [{"config": CONFIGS[name](toys), "out": str(tmp_path / name), "options": OPTIONS}
            for name in ("ties_global", "dare_ties")]
    r, res = run_worker(tmp_path, 2, jobs, init_group=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ties_global", "dare_ties"):
        same_files(single[name], str(tmp_path / name))
    assert res[0][0]["world"] == 2 and res[0][0]["ranks"][1]["bytes_all_reduced"] == 2 * MODELS * 65536 * 8
    assert res[0][-1] == res[1][-1] == {"group_still_initialised": True}


def test_the_cli_under_torchrun(toys, single, tmp_path):
    cfg = tmp_path / "ties.yml"
    cfg.write_text(CONFIGS["ties"](toys))
    out = tmp_path / "out"
    stats = tmp_path / "stats.json"
    r = torchrun(2, ["-m", "fastmerge", "merge", str(cfg), str(out), "--out-shard-size", "100K", "--random-seed", "7",
                     "--stats-json", str(stats)])
    assert r.returncode == 0, r.stderr[-3000:]
    same_files(single["ties"], str(out))
    assert "on 2 ranks" in r.stdout and "rank 1 (" in r.stdout
    s = json.loads(stats.read_text())
    assert s["world"] == 2 and [x["rank"] for x in s["ranks"]] == [0, 1] and all(x["peak_rss"] > 0 for x in s["ranks"])


def test_killed_rank_fails_the_job_and_resume_finishes_it(toys, single, tmp_path):
    out = str(tmp_path / "o")
    job = [{"config": CONFIGS["dare_ties"](toys), "out": out, "options": OPTIONS}]
    r, res = run_worker(tmp_path, 2, job, fault={"rank": 1, "after": 2, "kind": "kill"}, name="killed")
    assert r.returncode != 0
    assert "SIGKILL" in r.stderr or "Signal 9" in r.stderr or "exitcode  : -9" in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(out) and os.path.isdir(partial_dir(out))
    # rank 0 names the dead rank, whether it lost contact first or got the launcher's SIGTERM first
    assert "rank 1 (pid " in res[0][0]["error"] and "is no longer running (killed or crashed)" in res[0][0]["error"]
    logs = [f for f in os.listdir(os.path.join(partial_dir(out), ".fastmerge")) if f.startswith("written-")]
    assert "written-rank1.jsonl" in logs
    # a different rank count resumes it: the verified tensors are skipped, the result is identical
    job[0]["options"] = dict(OPTIONS, resume=True)
    r, res = run_worker(tmp_path, 3, job, name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res[0][0]["resumed"] >= 2
    same_files(single["dare_ties"], out)
    assert not os.path.exists(partial_dir(out))


def test_interrupted_rank_stops_the_others_and_resume_finishes(toys, single, tmp_path):
    out = str(tmp_path / "o")
    job = [{"config": CONFIGS["ties_global"](toys), "out": out, "options": OPTIONS}]
    r, res = run_worker(tmp_path, 2, job, fault={"rank": 1, "after": 1, "kind": "interrupt"}, name="int")
    assert r.returncode != 0
    assert res[1][0]["error"].startswith("MergeInterrupted: interrupted: the merge stopped cleanly")
    assert res[0][0]["error"].startswith("RankFailed: rank 1 failed: interrupted")
    for x in (res[0][0]["error"], res[1][0]["error"]):
        assert "kept in" in x and "--resume" in x
    assert not os.path.exists(out) and os.path.isdir(partial_dir(out))
    assert os.path.exists(os.path.join(partial_dir(out), ".fastmerge", "thresholds.json"))
    job[0]["options"] = dict(OPTIONS, resume=True)
    r, res = run_worker(tmp_path, 2, job, name="int-resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res[0][0]["resumed"] >= 1
    assert [x["bytes_all_reduced"] for x in res[0][0]["ranks"]] == [0, 0]  # the thresholds were kept
    same_files(single["ties_global"], out)


def test_bad_input_on_one_rank_stops_every_rank(toys, tmp_path):
    out = str(tmp_path / "o")
    fts = [toys["fts"][0], toys["bad"], toys["fts"][2]]
    r, res = run_worker(tmp_path, 2, [{"config": config(toys, "ties", fts=fts), "out": out, "options": OPTIONS}])
    assert r.returncode != 0
    assert "holds nan" in res[1][0]["error"] and "head.weight" in res[1][0]["error"]
    assert res[0][0]["error"].startswith("RankFailed: rank 1 failed: model ") and "holds nan" in res[0][0]["error"]
    assert not os.path.exists(out) and not os.path.exists(partial_dir(out))  # a bad input: nothing kept


@pytest.mark.parametrize("kind, own, told", [
    ("enospc", "MergeError: no space left on the device of", "RankFailed: rank 1 failed: no space left on the device of "),
    ("blind", "must be on storage that every rank shares", "RankFailed: rank 1 failed: rank 1 on "),
])
def test_a_failure_on_one_rank_stops_every_rank_and_keeps_nothing(toys, tmp_path, kind, own, told):
    """A full disk on one rank (the space is given back), or a rank that cannot see the output folder
    that rank 0 created (nothing was merged)."""
    out = str(tmp_path / "o")
    r, res = run_worker(tmp_path, 2, [{"config": CONFIGS["ties"](toys), "out": out, "options": OPTIONS}],
                        fault={"rank": 1, "kind": kind})
    assert r.returncode != 0
    assert own in res[1][0]["error"]
    assert res[0][0]["error"].startswith(told)
    assert not os.path.exists(out) and not os.path.exists(partial_dir(out))


def test_a_stuck_rank_is_reported_as_a_timeout(toys, tmp_path):
    out = str(tmp_path / "o")
    job = [{"config": CONFIGS["linear"](toys), "out": out, "options": dict(OPTIONS, timeout=4)}]
    r, res = run_worker(tmp_path, 2, job, fault={"rank": 1, "after": 1, "kind": "hang"})
    assert r.returncode != 0
    assert res[0][0]["error"].startswith("CollectiveTimeout: rank 0 ") and "timed out after 4 s" in res[0][0]["error"]
    assert "--resume" in res[0][0]["error"]
    assert not os.path.exists(out)


def test_bench_merge_with_two_ranks(tmp_path):
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "fastmerge", "bench-merge", "--size", "tiny", "--models", "2", "--dtypes",
                        "float32", "--methods", "ties", "ties_global", "--nproc", "1", "2", "--no-mergekit",
                        "--repeat", "2", "--workdir", str(tmp_path / "w"), "--json", str(report)],
                       capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(report.read_text())["runs"]
    assert [e["method"] for e in runs] == ["ties", "ties_global"]
    for e in runs:
        fm = e["fastmerge"]
        assert fm["rc"] == 0 and [x["rc"] for x in fm["each"]] == [0, 0]
        each = sorted(x["seconds"] for x in fm["each"])
        # how the runs are summarised is tested on scripted runs in test_bench_merge.py
        assert each[0] <= fm["seconds"] <= each[1]
        assert all(x["peak_rss_bytes"] > 50 << 20 for x in fm["each"])  # a Python process that imported torch
        assert fm["merge_seconds"] > 0
        d = e["fastmerge_2_ranks"]
        assert d["rc"] == 0 and d["identical_to_one_process"] is True and len(d["ranks"]) == 2
        assert all(x["peak_rss"] > 0 and x["tensors"] > 0 for x in d["ranks"])
    assert runs[1]["fastmerge_2_ranks"]["ranks"][0]["bytes_all_reduced"] == 2 * 2 * 65536 * 8


def test_lost_contact_waits_for_a_killed_rank_to_be_seen_dead(monkeypatch):
    """A killed peer's sockets close while its process is still exiting: the rank that lost contact
    looks again for a moment, so the error names the dead rank (seen once under load)."""
    from fastmerge.merge import dist as mdist

    g = mdist.Group(distributed=False)
    g.world = 2
    seen = iter(["", "", "; rank 1 (pid 7 on h) is no longer running (killed or crashed)"])
    monkeypatch.setattr(g, "gone_text", lambda: next(seen))
    err = g._lost(RuntimeError("Connection closed by peer"), "finishing")
    assert isinstance(err, mdist.RankFailed) and "rank 1 (pid 7 on h) is no longer running" in str(err)
    monkeypatch.setattr(mdist, "LOST_GRACE_S", 0.2)
    monkeypatch.setattr(g, "gone_text", lambda: "")
    err = g._lost(RuntimeError("Connection closed by peer"), "finishing")
    assert "another rank has probably died" in str(err)
