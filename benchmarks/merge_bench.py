"""``fastmerge bench-merge``: time ``fastmerge merge`` (and ``mergekit-yaml`` where installed) on
generated Llama-shaped checkpoints.

For each dtype and method it runs, each in a fresh process with the input files in the page cache:
- a plain read of every input file (``readinto`` a reused buffer: the rate a merge can at best reach);
- ``fastmerge merge`` on the config;
- ``mergekit-yaml`` on the same config, where it is installed (``--mergekit PATH`` or on PATH);
- with ``--nproc 2 ...``: the same merge under ``torchrun`` with that many ranks (gloo), each rank's wall
  time and peak RSS, and whether its files are bit-identical to the one-process output.

It reports the wall time of each process, its peak RSS (from ``wait4``), input GB/s, the ratio to the
plain read, mergekit's time over ours, and the largest difference between the two outputs' tensors.
Everything goes to a JSON report (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

SIZES = {
    # name: hidden, layers, intermediate, vocab, heads, kv heads
    "tiny": (64, 2, 176, 256, 4, 2),
    "small": (256, 4, 704, 4096, 8, 4),
    "270m": (1024, 16, 2816, 32000, 16, 8),
    "1b": (2048, 21, 5632, 32000, 32, 8),  # about 4x the 270m shape (1.08B parameters)
    # the Llama-3 layer shapes, with the full vocabulary and an untied output head
    "3b": (3072, 28, 8192, 128256, 24, 8),  # 3.61B parameters
    "8b": (4096, 32, 14336, 128256, 32, 8),  # 8.03B parameters
}
REAL_SIZES = ("3b", "8b")  # written in bf16 shards of 5 GB, as published checkpoints are


def llama_config(size: str, dtype: str, layers: Optional[int] = None) -> dict:
    h, L, inter, vocab, heads, kv = SIZES[size]
    L = L if layers is None else layers
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "num_hidden_layers": L,
        "intermediate_size": inter, "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_shapes(cfg: dict) -> List[tuple]:
    h, L, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kvd = hd * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kvd, h)),
                (p + "self_attn.v_proj.weight", (kvd, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def make_checkpoints(folder: str, size: str = "270m", n_models: int = 4, dtype: str = "float32", seed: int = 0,
                     shard_size: int = 2 * 1000 ** 3, noise: float = 0.1, layers: Optional[int] = None) -> List[str]:
    """A base and ``n_models`` fine-tunes (base + noise * N(0, std of the tensor)), as Hugging Face
    folders of safetensors shards with a Llama config.json. Reused when already generated."""
    import torch

    from fastmerge.merge.io import OutTensor, ShardLayout, ShardWriter

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cfg = llama_config(size, dtype, layers)
    shapes = llama_shapes(cfg)
    names = ["base"] + [f"ft{i}" for i in range(n_models)]
    stamp = json.dumps({"size": size, "dtype": dtype, "seed": seed, "noise": noise, "shard": shard_size,
                        "layers": cfg["num_hidden_layers"]})
    folders = []
    for k, name in enumerate(names):
        path = os.path.join(folder, name)
        folders.append(path)
        marker = os.path.join(path, ".generated")
        if os.path.exists(marker) and open(marker).read() == stamp:
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        layout = ShardLayout([OutTensor(n, tdt, s) for n, s in shapes], shard_size)
        layout.create(path)
        w = ShardWriter(path, layout)
        for j, (n, s) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed * 1000003 + j)
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                x = torch.ones(s)
            else:
                x = torch.randn(s, generator=g) * 0.02
            if k > 0:
                gk = torch.Generator().manual_seed(seed * 1000003 + j + 7919 * k)
                x = x + torch.randn(s, generator=gk) * (0.02 * noise)
            w.add(n, x.to(tdt))
        w.finish()
        layout.write_index(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(marker, "w") as f:
            f.write(stamp)
    return folders


def write_config(path: str, method: str, folders: List[str], density: float = 0.5) -> str:
    """A config over the generated models. ``ties_global`` is ``ties`` with ``scope: global`` (one exact
    threshold per model over all of its tensors: fastmerge's extension, which mergekit does not run)."""
    base, fts = folders[0], folders[1:]
    scope = method == "ties_global"
    method = "ties" if scope else method
    lines = [f"merge_method: {method}", f"base_model: {base}" if method != "linear" else "", "models:"]
    if method == "linear":
        for f in folders:
            lines += [f"  - model: {f}", "    parameters:", "      weight: 1.0"]
    else:
        for i, f in enumerate(fts):
            lines += [f"  - model: {f}"]
            if method == "model_stock":
                continue
            lines += ["    parameters:", f"      weight: {1.0 - 0.1 * i:.2f}"]
            if method in ("ties", "dare_ties", "breadcrumbs_ties", "breadcrumbs"):
                lines.append(f"      density: {density}")
    if method != "model_stock":
        lines += ["parameters:", "  lambda: 1.0" if method != "linear" else "  normalize: true"]
        if scope:
            lines.append("  scope: global")
    with open(path, "w") as fh:
        fh.write("\n".join(x for x in lines if x) + "\n")
    return path


def input_files(folders: List[str]) -> List[str]:
    return [os.path.join(f, n) for f in folders for n in sorted(os.listdir(f)) if n.endswith(".safetensors")]


def plain_read(files: List[str], block: int = 64 << 20) -> Dict[str, float]:
    """Read every byte of the files with readinto into one reused buffer; returns bytes and seconds."""
    buf = bytearray(block)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return {"bytes": total, "seconds": time.perf_counter() - t0}


READERS = (1, 2, 4, 8)


def make_ready(files: List[str], cold: bool) -> Optional[float]:
    """Before a timed run: with ``cold``, drop the files from the page cache and return the share of their
    pages still resident (checked with mincore); else read them once, so they are all cached."""
    from fastmerge.merge.readahead import evict, resident_share

    if not cold:
        plain_read(files)
        return None
    evict(files)
    return resident_share(files)


def cacheable(files: List[str]) -> List[str]:
    """The longest prefix of the files that fits in half the memory the system has available (all of
    them when they fit): a warm read of more than the page cache holds would come from the disk."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if avail is None:
        return list(files)
    out, total = [], 0
    for p in files:
        total += os.path.getsize(p)
        if total > avail // 2 and out:
            break
        out.append(p)
    return out


def best_plain_read(files: List[str], cold: bool) -> Dict[str, object]:
    """The plain read at its best: the fastest of 1, 2, 4 and 8 concurrent readers, each run from the same
    starting state (cold: every file dropped from the page cache first; warm: every file cached)."""
    from fastmerge.merge.readahead import read_files

    runs = []
    for k in READERS:
        share = make_ready(files, cold)
        r = read_files(files, k)
        r["resident_before"] = share
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9
        runs.append(r)
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["each"] = runs
    return best


_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1] + ".out", "w"), stderr=open(sys.argv[1] + ".err", "w"))
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"seconds": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "rc": rc}, open(sys.argv[1], "w"))
"""


def timed(cmd: List[str]) -> Dict[str, object]:
    """Run a command under a small wrapper process: wall time, peak RSS and exit status of the command
    alone (a child forked from this process would start with this process's memory counted)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rep = os.path.join(d, "r.json")
        subprocess.run([sys.executable, "-c", _WRAPPER, rep, *cmd], check=True)
        with open(rep) as f:
            res = json.load(f)
        res["stdout_tail"] = open(rep + ".out").read()[-2000:]
        res["stderr_tail"] = open(rep + ".err").read()[-2000:]
    res["cmd"] = " ".join(cmd)
    return res


def repeated(cmd: List[str], files: List[str], repeat: int, cold: bool = False,
             readers: Optional[int] = None) -> Dict[str, object]:
    """:func:`timed` ``repeat`` times, each after a plain read of the inputs (or, ``cold``, after they
    were dropped from the page cache): the medians of the wall and merge times (the merge time is the one
    the command's summary line reports), the largest peak RSS, the worst exit code, the last run's
    output, and every run under ``each``. With ``readers`` (cold runs), each run is paired with a cold
    plain read by that many readers just before it, and ``ratio_to_paired_read`` is the median of the
    runs' wall time over their own read's (a disk's speed drifts within minutes)."""
    from fastmerge.merge.readahead import read_files

    runs = []
    for _ in range(max(1, repeat)):
        paired = None
        if cold and readers:
            make_ready(files, True)
            paired = read_files(files, readers)["seconds"]
        share = make_ready(files, cold)
        r = timed(cmd)
        r["resident_before"] = share
        if paired is not None:
            r["paired_read_seconds"] = paired
            r["ratio_to_paired_read"] = r["seconds"] / paired
        m = re.search(r"([0-9.]+) GB read from storage", str(r["stdout_tail"]))
        if m:
            r["storage_read_gb"] = float(m.group(1))
        m = re.search(r" in ([0-9.]+) s \(", str(r["stdout_tail"]))
        if m:  # the merge itself, without starting Python and importing torch
            r["merge_seconds"] = float(m.group(1))
        runs.append(r)
    out = dict(runs[-1])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    if all("merge_seconds" in r for r in runs):
        out["merge_seconds"] = statistics.median(r["merge_seconds"] for r in runs)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    out["rc"] = next((r["rc"] for r in runs if r["rc"] != 0), 0)
    if all("ratio_to_paired_read" in r for r in runs):
        out["ratio_to_paired_read"] = statistics.median(r["ratio_to_paired_read"] for r in runs)
    out["each"] = [{k: r[k] for k in ("seconds", "merge_seconds", "peak_rss_bytes", "rc", "resident_before",
                                      "storage_read_gb", "paired_read_seconds", "ratio_to_paired_read") if k in r}
                   for r in runs]
    return out


def same_files(a: str, b: str) -> bool:
    """Whether two output folders hold the same files with the same bytes (SHA-256 of each)."""
    import hashlib

    def digests(folder):
        out = {}
        for name in sorted(os.listdir(folder)):
            h = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(64 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
        return out

    return digests(a) == digests(b)


def distributed_run(cfg: str, out: str, nproc: int, reference_out: str, threads: Optional[int]) -> Dict[str, object]:
    """The merge under torchrun with ``nproc`` ranks on this host: wall time of the launcher, each rank's
    figures (from ``--stats-json``) and whether the files equal the one-process output."""
    stats = out + ".stats.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastmerge", "merge", cfg, out, "--overwrite", "--stats-json", stats]
    if threads:
        cmd += ["--threads", str(threads)]
    r = timed(cmd)
    if r["rc"] == 0:
        with open(stats) as f:
            res = json.load(f)
        os.remove(stats)
        r["merge_seconds"] = res["seconds"]
        r["ranks"] = [{k: x[k] for k in ("rank", "tensors", "in_bytes", "seconds", "peak_rss", "bytes_all_reduced")}
                      for x in res["ranks"]]
        r["identical_to_one_process"] = same_files(out, reference_out) if os.path.isdir(reference_out) else None
    return r


def compare_outputs(a: str, b: str) -> Dict[str, object]:
    """Largest absolute and relative difference between the tensors of two output folders."""
    import torch

    from fastmerge.merge.io import Checkpoint

    ca, cb = Checkpoint(a, "fastmerge"), Checkpoint(b, "mergekit")
    try:
        if set(ca.tensors) != set(cb.tensors):
            return {"same_names": False, "only_fastmerge": sorted(set(ca.tensors) - set(cb.tensors))[:5],
                    "only_mergekit": sorted(set(cb.tensors) - set(ca.tensors))[:5]}
        worst_abs = worst_rel = 0.0
        allclose = True
        differing = 0
        for n in ca.tensors:
            x, y = ca.get(n).double(), cb.get(n).double()
            d = (x - y).abs()
            worst_abs = max(worst_abs, float(d.max()) if d.numel() else 0.0)
            rel = d / y.abs().clamp_min(1e-12)
            worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
            allclose &= bool(torch.allclose(x, y, rtol=1e-5, atol=1e-8))
            differing += int((~torch.isclose(x, y, rtol=1e-5, atol=1e-8)).sum())
        return {"same_names": True, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
                "allclose_rtol_1e-5": allclose, "entries_outside_rtol_1e-5": differing,
                "entries": sum(t.numel for t in ca.tensors.values())}
    finally:
        ca.close()
        cb.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="270m", choices=sorted(SIZES),
                   help="model shape (default 270m: ~271M parameters; 3b and 8b: the Llama-3 layer shapes, with "
                        "the 128256-token embedding and an untied head, in 5 GB shards)")
    p.add_argument("--layers", type=int, default=None,
                   help="cut the depth to N layers (to fit the disk; the report says so)")
    p.add_argument("--cold", action="store_true",
                   help="drop every input file from the page cache before each run (plain reads, fastmerge and "
                        "mergekit) and report the share of pages still resident (mincore)")
    p.add_argument("--max-memory", default=None, help="passed to fastmerge merge (default: its own)")
    p.add_argument("--models", type=int, default=4, help="fine-tunes besides the base (default 4)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="checkpoint dtypes (default both)")
    p.add_argument("--methods", nargs="+", default=["ties", "linear", "task_arithmetic"],
                   help="methods to time (ties_global: ties with scope: global, fastmerge only)")
    p.add_argument("--workdir", default="runs/bench-merge", help="where checkpoints and outputs go")
    p.add_argument("--mergekit", default=None,
                   help="mergekit-yaml executable (default: the one on PATH; skipped when there is none)")
    p.add_argument("--no-mergekit", action="store_true", help="do not run mergekit")
    p.add_argument("--mergekit-dtypes", nargs="+", default=["float32"],
                   help="dtypes on which mergekit is also run (default float32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each fastmerge merge; times are their medians (default 3; mergekit runs once)")
    p.add_argument("--json", default="fastmerge-bench-merge.json", help="report path")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged folders")
    p.add_argument("--nproc", nargs="+", type=int, default=[1],
                   help="rank counts: each count above 1 also runs the merge under torchrun with that many "
                        "processes on this host (default: 1 only)")


def run(args: argparse.Namespace) -> int:
    mk = None if args.no_mergekit else (args.mergekit or shutil.which("mergekit-yaml"))
    os.makedirs(args.workdir, exist_ok=True)
    layers = SIZES[args.size][1] if args.layers is None else args.layers
    report = {"size": args.size, "layers": layers, "full_depth": SIZES[args.size][1], "models": args.models,
              "cpu_count": os.cpu_count(), "cold": args.cold, "runs": []}
    if layers != SIZES[args.size][1]:
        print(f"note: {args.size} cut to {layers} of its {SIZES[args.size][1]} layers (--layers)", file=sys.stderr)
    py = sys.executable
    shard = 5 * 1000 ** 3 if args.size in REAL_SIZES else 2 * 1000 ** 3
    for dtype in args.dtypes:
        t0 = time.perf_counter()
        tag = f"{args.size}-{dtype}" + (f"-{layers}l" if args.layers is not None else "")
        folders = make_checkpoints(os.path.join(args.workdir, tag), args.size, args.models, dtype, shard_size=shard,
                                   layers=args.layers)
        files = input_files(folders)
        print(f"[{dtype}] checkpoints ready in {time.perf_counter() - t0:.1f} s: {len(folders)} models, "
              f"{sum(os.path.getsize(f) for f in files) / 1e9:.2f} GB", file=sys.stderr)
        fit = cacheable(files)
        warm = best_plain_read(fit, cold=False)
        warm["all_files"] = len(fit) == len(files)
        report.setdefault("plain_read", {})[dtype] = {"warm": warm}
        print(f"[{dtype}] plain read, warm: {warm['bytes'] / 1e9:.2f} GB in {warm['seconds']:.2f} s = "
              f"{warm['gbps']:.2f} GB/s (best of " + ", ".join(f"{r['readers']} readers {r['gbps']:.2f}"
                                                             for r in warm["each"]) + ")"
              + ("" if warm["all_files"] else f"; on the first {len(fit)} of {len(files)} files, which fit the "
                                              f"page cache"), file=sys.stderr)
        rd = warm
        if args.cold:
            cold = best_plain_read(files, cold=True)
            report["plain_read"][dtype]["cold"] = cold
            print(f"[{dtype}] plain read, cold: {cold['seconds']:.2f} s = {cold['gbps']:.2f} GB/s (best of "
                  + ", ".join(f"{r['readers']} readers {r['gbps']:.2f}" for r in cold["each"])
                  + "; resident before: " + ", ".join(f"{100 * r['resident_before']:.1f} %" for r in cold["each"])
                  + ")", file=sys.stderr)
            rd = cold
        read_gbps = rd["bytes"] / rd["seconds"] / 1e9
        total = sum(os.path.getsize(f) for f in files)
        read_seconds = total / (read_gbps * 1e9)  # a plain read of every input at that rate
        for method in args.methods:
            cfg = write_config(os.path.join(args.workdir, f"{method}-{dtype}.yml"), method, folders)
            out_fm = os.path.join(args.workdir, f"out-fastmerge-{method}-{dtype}")
            cmd = [py, "-m", "fastmerge", "merge", cfg, out_fm, "--overwrite"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.max_memory:
                cmd += ["--max-memory", str(args.max_memory)]
            fm = repeated(cmd, files, args.repeat, args.cold, rd.get("readers") if args.cold else None)
            entry = {"dtype": dtype, "method": method, "input_bytes": total, "plain_read_gbps": read_gbps,
                     "plain_read_seconds": read_seconds, "cold": args.cold, "fastmerge": fm}
            if fm["rc"] != 0:
                print(f"[{dtype}] {method}: fastmerge failed: {fm['stderr_tail']}", file=sys.stderr)
            fm["input_gbps"] = total / fm["seconds"] / 1e9
            fm["share_of_plain_read"] = fm["input_gbps"] / read_gbps
            if "merge_seconds" in fm:
                fm["merge_input_gbps"] = total / fm["merge_seconds"] / 1e9
                fm["merge_share_of_plain_read"] = fm["merge_input_gbps"] / read_gbps
            line = (f"[{dtype}] {method}: fastmerge {fm['seconds']:.2f} s (merge {fm.get('merge_seconds', 0):.2f} s"
                    f"{', medians of %d runs' % args.repeat if args.repeat > 1 else ''}), "
                    f"peak RSS {fm['peak_rss_bytes'] / 1e9:.2f} GB, {fm['input_gbps']:.2f} GB/s = "
                    f"{100 * fm['share_of_plain_read']:.0f} % of a plain read "
                    f"({100 * fm.get('merge_share_of_plain_read', 0):.0f} % for the merge alone); "
                    f"{fm['seconds'] / read_seconds:.2f}x the {'cold' if args.cold else 'warm'} plain read")
            if "ratio_to_paired_read" in fm:
                line += (f"; {fm['ratio_to_paired_read']:.2f}x a cold plain read run just before it (median of "
                         + ", ".join(f"{r['seconds']:.1f}/{r['paired_read_seconds']:.1f} s" for r in fm["each"]) + ")")
            if args.cold:
                shares = [r.get("resident_before") for r in fm["each"]]
                line += ", resident before: " + ", ".join(f"{100 * x:.1f} %" for x in shares if x is not None)
                reads = [r.get("storage_read_gb") for r in fm["each"] if r.get("storage_read_gb") is not None]
                if reads:
                    line += ", read from storage: " + ", ".join(f"{x:.2f} GB" for x in reads)
            for nproc in sorted(set(args.nproc) - {1}):
                out_p = f"{out_fm}-{nproc}ranks"
                make_ready(files, args.cold)
                d = distributed_run(cfg, out_p, nproc, out_fm, args.threads)
                entry[f"fastmerge_{nproc}_ranks"] = d
                if d["rc"] != 0:
                    line += f"; {nproc} ranks failed: {d['stderr_tail'][-300:]}"
                else:
                    line += (f"; {nproc} ranks: {d['seconds']:.2f} s (merge {d['merge_seconds']:.2f} s), per rank "
                             + ", ".join(f"{x['seconds']:.2f} s / {x['peak_rss'] / 1e9:.2f} GB" for x in d["ranks"])
                             + f", identical files: {d['identical_to_one_process']}")
                if not args.keep_outputs:
                    shutil.rmtree(out_p, ignore_errors=True)
            if mk and dtype in args.mergekit_dtypes and method != "ties_global":
                out_mk = os.path.join(args.workdir, f"out-mergekit-{method}-{dtype}")
                shutil.rmtree(out_mk, ignore_errors=True)
                share = make_ready(files, args.cold)
                r = timed([mk, cfg, out_mk, "--no-copy-tokenizer"])
                r["resident_before"] = share
                entry["mergekit"] = r
                if r["rc"] == 0:
                    entry["speedup_over_mergekit"] = r["seconds"] / fm["seconds"]  # process wall times
                    if fm["rc"] == 0:
                        entry["agreement"] = compare_outputs(out_fm, out_mk)
                    line += (f"; mergekit {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB: "
                             f"{entry['speedup_over_mergekit']:.1f}x faster; outputs: {entry.get('agreement')}")
                else:
                    line += f"; mergekit failed (rc {r['rc']}): {r['stderr_tail'][-300:]}"
                if not args.keep_outputs:
                    shutil.rmtree(out_mk, ignore_errors=True)
            print(line, file=sys.stderr)
            if not args.keep_outputs:
                shutil.rmtree(out_fm, ignore_errors=True)
            report["runs"].append(entry)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps([{k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if "tail" not in kk})
                       for k, v in e.items()} for e in report["runs"]], indent=1))
    print(f"report: {args.json}", file=sys.stderr)
    return 0
