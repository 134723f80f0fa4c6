"""``fastmerge bench-merge``: the Llama-3 shapes of --size 3b / 8b, --layers, and a --cold run whose
report holds the plain reads by 1, 2, 4 and 8 readers and the share of pages still cached before each run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from fastmerge.benchmarks import merge_bench as B


def _params(size, layers=None):
    return sum(math.prod(s) for _, s in B.llama_shapes(B.llama_config(size, "bfloat16", layers)))


def test_real_sizes_have_the_llama3_shapes():
    # Llama-3.2-3B with an untied head and Llama-3.1-8B: 3.61B and 8.03B parameters
    assert round(_params("3b") / 1e9, 2) == 3.61
    assert round(_params("8b") / 1e9, 2) == 8.03
    shapes = dict(B.llama_shapes(B.llama_config("8b", "bfloat16")))
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (128256, 4096)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (14336, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads of 128
    cut = dict(B.llama_shapes(B.llama_config("3b", "bfloat16", 2)))
    assert "model.layers.1.mlp.up_proj.weight" in cut and "model.layers.2.mlp.up_proj.weight" not in cut
    assert B.llama_config("3b", "bfloat16", 2)["num_hidden_layers"] == 2


def test_bench_merge_cold(tmp_path):
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "fastmerge", "bench-merge", "--size", "tiny", "--layers", "1", "--models",
                        "2", "--dtypes", "bfloat16", "--methods", "linear", "ties", "--no-mergekit", "--repeat", "1",
                        "--cold", "--workdir", str(tmp_path / "w"), "--json", str(report)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cut to 1 of its 2 layers" in r.stderr
    rep = json.loads(report.read_text())
    assert rep["layers"] == 1 and rep["cold"] is True
    reads = rep["plain_read"]["bfloat16"]
    assert [x["readers"] for x in reads["cold"]["each"]] == [1, 2, 4, 8]
    assert all(0 <= x["resident_before"] <= 1 for x in reads["cold"]["each"])
    assert reads["warm"]["all_files"] is True
    for e in rep["runs"]:
        fm = e["fastmerge"]
        assert fm["rc"] == 0 and e["cold"] is True
        assert all(x["resident_before"] is not None for x in fm["each"])
        # each cold run is paired with a cold plain read just before it
        assert all(x["paired_read_seconds"] > 0 for x in fm["each"])
        # the pairing read is a cold plain read by the readers of the best cold read above: the same bytes,
        # so a time of the same order (not the merge's, nor in other units)
        paired = fm["each"][0]["paired_read_seconds"]
        assert reads["cold"]["seconds"] / 100 < paired < reads["cold"]["seconds"] * 100
        # a merge in a new process reads the same bytes and starts Python: slower than the read alone
        assert math.isfinite(fm["ratio_to_paired_read"]) and fm["ratio_to_paired_read"] > 1
        assert e["input_bytes"] > 0 and e["plain_read_seconds"] > 0


def test_repeated_runs_report_medians(monkeypatch):
    """The summary of repeated runs, on scripted runs: medians of the wall and merge times and of the
    per-run ratios to their paired reads, the largest peak RSS, the first failing exit code."""
    from fastmerge.merge import readahead

    runs = iter([
        {"seconds": 3.0, "peak_rss_bytes": 10, "rc": 0, "stdout_tail": "merged in 1.5 s (4 tensors)"},
        {"seconds": 1.0, "peak_rss_bytes": 30, "rc": 2, "stdout_tail": "0.25 GB read from storage; merged in 0.5 s ("},
        {"seconds": 1.5, "peak_rss_bytes": 20, "rc": 0, "stdout_tail": "merged in 4.0 s (4 tensors)"},
    ])
    reads = iter([0.5, 0.5, 4.0])
    monkeypatch.setattr(B, "timed", lambda cmd: dict(next(runs)))
    monkeypatch.setattr(readahead, "read_files", lambda files, readers: {"seconds": next(reads)})
    out = B.repeated(["merge"], [], 3, cold=True, readers=2)
    assert out["seconds"] == 1.5 and out["merge_seconds"] == 1.5  # means: 11/6 and 2
    # per run 3/0.5 = 6, 1/0.5 = 2, 1.5/4 = 0.375: the median is 2 (the ratio of the medians would be 3)
    assert out["ratio_to_paired_read"] == 2.0
    assert out["peak_rss_bytes"] == 30 and out["rc"] == 2
    assert [x["seconds"] for x in out["each"]] == [3.0, 1.0, 1.5]
    assert [x["paired_read_seconds"] for x in out["each"]] == [0.5, 0.5, 4.0]
    assert [x.get("storage_read_gb") for x in out["each"]] == [None, 0.25, None]
