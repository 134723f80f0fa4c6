"""The ``fastmerge`` command line: ``python -m fastmerge`` and a tiny ``fastmerge bench`` run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fastmerge.benchmarks import cases


def _run(args, timeout=240):
    return subprocess.run([sys.executable, "-m", "fastmerge", *args], capture_output=True, text=True, timeout=timeout)


def test_module_help():
    r = _run(["--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout


def test_bench_help_lists_options():
    r = _run(["bench", "--help"], timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--quick", "--ops", "--sizes", "--tasks", "--dtype", "--backends", "--reps", "--json", "--no-reference"):
        assert opt in r.stdout


def test_no_command_prints_help():
    r = _run([], timeout=120)
    assert r.returncode == 2
    assert "bench" in r.stdout


@pytest.mark.skipif(shutil.which("fastmerge") is None, reason="console script not on PATH")
def test_console_script_help():
    r = subprocess.run(["fastmerge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    sizes = [1000, 20000]
    proc = _run(["bench", "--quick", "--sizes", *map(str, sizes), "--reps", "3", "--stream-mib", "64", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())

    bw = data["bandwidth"]
    assert bw["read_median_GBps"] > 0 and bw["copy_median_GBps"] > 0
    assert data["machine"]["cpu_capability"]
    assert data["total_seconds"] > 0

    T = data["config"]["T"]
    assert data["config"]["dtypes"] == ["fp32"] and T >= 2
    # the least traffic of one call, in fp32 vectors of d entries each read or written once:
    # uniform average: T inputs + the output; task arithmetic, TIES: the base, T inputs + the output;
    # cosine: the base + T inputs (the T x T result is negligible); block_scale forward: the base, T
    # inputs + the output; its backward: the output's gradient + T inputs; forward + backward: both
    vectors = {"uniform_average": T + 1, "task_arithmetic": T + 2, "merge_ties": T + 2, "merge_ties_tensor": T + 2,
               "task_vector_cosine": T + 1, "block_scale": T + 2, "block_scale_backward": T + 1,
               "block_scale_fwd_bwd": (T + 2) + (T + 1)}
    assert set(vectors) == set(cases.OP_NAMES)
    rows = {(r["op"], r["backend"], r["d"]): r for r in data["results"]}
    for op in cases.OP_NAMES:
        for be in ("cpu", "reference"):
            for d in sizes:
                r = rows.get((op, be, d))
                assert r is not None, f"missing {op} {be} d={d}"
                assert "error" not in r, r.get("error")
                assert r["reps"] == 3 and len(r["times_s"]) == 3
                assert all(t > 0 for t in r["times_s"])
                assert r["median_s"] > 0 and r["min_s"] > 0 and r["iqr_s"] >= 0
                times = sorted(r["times_s"])
                assert r["median_s"] == pytest.approx(times[1], rel=1e-12) and r["min_s"] == times[0]
                assert r["min_bytes"] == vectors[op] * 4 * d
                assert r["GBps"] == pytest.approx(vectors[op] * 4 * d / times[1] / 1e9, rel=1e-12)
                assert r["pct_read_bw"] == pytest.approx(100 * r["GBps"] / bw["read_median_GBps"], rel=1e-12)
                mem = r["memory"]
                assert "error" not in mem, mem.get("error")
                assert mem["before_bytes"] > 0 and mem["peak_bytes"] >= mem["before_bytes"]
                assert mem["peak_extra_bytes"] >= 0 and mem["output_bytes"] > 0
                if be == "cpu":
                    ref_median = sorted(rows[(op, "reference", d)]["times_s"])[1]
                    assert r["speedup_vs_reference"] == pytest.approx(ref_median / times[1], rel=1e-12)
                if cases.OPS[op].is_ties:
                    assert r["ratio_to_fused_average"] > 0
                    if be == "cpu":
                        assert {"strategy", "passes", "bracket_misses"} <= set(r["ties_stats"])
                if cases.OPS[op].phases:
                    assert r["forward_median_s"] > 0 and r["backward_median_s"] > 0
    # the table went to stdout
    for op in cases.OP_NAMES:
        assert op in proc.stdout
    assert "GB/s" in proc.stdout and "peak extra" in proc.stdout
    assert "(1/" in proc.stderr  # progress lines


def test_time_calls_warms_up_until_settled():
    from fastmerge.benchmarks import runner

    calls = []
    left = [3]

    def settle():
        left[0] -= 1
        return left[0] >= 0

    times, _, _ = runner.time_calls(lambda: calls.append(1), 2, lambda w: 4, settle)
    assert len(times) == 4
    assert len(calls) == 2 + 3 + 4  # 2 warm-up calls, 3 more while unsettled, 4 timed
    calls.clear()
    runner.time_calls(lambda: calls.append(1), 1, lambda w: 1, lambda: True)
    assert len(calls) == 1 + runner.MAX_SETTLE_CALLS + 1


_SETTLE_SCRIPT = r"""
import torch, fastmerge
from fastmerge.benchmarks import runner
base = torch.randn(8 << 20)
thetas = [base + 1, base - 1]
# not a streaming op: its warm-up call did not move the tuner, so warm-up stops there
s = runner.PrefetchSettle()
n = [0]
def cos():
    n[0] += 1
    return fastmerge.task_vector_cosine(base, thetas)
runner.time_calls(cos, 1, lambda w: 1, s)
assert n[0] == 2, n[0]  # one warm-up call, one timed
assert fastmerge.cpu_prefetch_state()["chosen"] == "tuning"
# a streaming op (96 MiB read and written per call) warms up until the tuner has chosen
runner.time_calls(lambda: fastmerge.task_arithmetic(base, thetas), 1, lambda w: 1, runner.PrefetchSettle())
st = fastmerge.cpu_prefetch_state()
assert st["chosen"] in ("on", "off"), st
print("ok", st["runs_on"], st["runs_off"])
"""


def test_bench_waits_for_the_prefetch_choice():
    import os

    env = {k: v for k, v in os.environ.items() if k != "FASTMERGE_CPU_PREFETCH"}
    r = subprocess.run([sys.executable, "-c", _SETTLE_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")


@pytest.mark.parametrize("nbytes", [8, 64, 8 * 1000003, 1 << 22])
def test_stream_read_reads_every_word_whatever_the_streams(nbytes):
    import numpy as np
    import torch

    from fastmerge import _C

    x = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    want = np.bitwise_xor.reduce(x.numpy().view(np.uint64))
    for streams in (1, 2, 9, 64):
        got = _C.stream_read(x, streams)
        assert np.uint64(got & (2**64 - 1)) == want, streams
    with pytest.raises(ValueError, match="streams"):
        _C.stream_read(x, 0)


def test_bench_capability_runs_each_build_side_by_side(tmp_path):
    from fastmerge import _C

    supported = list(_C.cpu_capabilities())
    out = tmp_path / "caps.json"
    proc = _run(["bench", "--quick", "--sizes", "70000", "--reps", "3", "--stream-mib", "64", "--no-memory",
                 "--backends", "cpu", "--ops", "uniform_average", "merge_ties", "--capability", "all", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    order = [c for c in ("AVX512", "AVX2", "DEFAULT") if c in supported]
    assert data["config"]["capabilities"] == order
    rows = {(r["op"], r["backend"]): r for r in data["results"]}
    for cap in order:
        avg, ties = rows[("uniform_average", f"cpu:{cap}")], rows[("merge_ties", f"cpu:{cap}")]
        assert avg["capability"] == cap and ties["capability"] == cap
        # each build's TIES is compared with the average of the same build
        assert ties["fused_average_median_s"] == avg["median_s"]
        assert f"cpu:{cap}" in proc.stdout
    assert "side by side" in proc.stdout
    # a build the CPU cannot run, or no such build, is refused by name
    bad = [c for c in ("AVX512", "AVX2") if c not in supported]
    if bad:
        proc = _run(["bench", "--quick", "--sizes", "1000", "--no-memory", "--capability", bad[0]])
        assert proc.returncode != 0 and f"cannot run the {bad[0]} build" in proc.stderr
    proc = _run(["bench", "--quick", "--sizes", "1000", "--no-memory", "--capability", "SSE9"])
    assert proc.returncode != 0 and "unknown --capability 'SSE9'" in proc.stderr
