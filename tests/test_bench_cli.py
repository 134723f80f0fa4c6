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
                assert r["min_bytes"] > 0 and r["GBps"] > 0 and r["pct_read_bw"] > 0
                mem = r["memory"]
                assert "error" not in mem, mem.get("error")
                assert mem["before_bytes"] > 0 and mem["peak_bytes"] >= mem["before_bytes"]
                assert mem["peak_extra_bytes"] >= 0 and mem["output_bytes"] > 0
                if be == "cpu":
                    assert r["speedup_vs_reference"] > 0
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
