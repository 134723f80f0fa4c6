"""``fastmerge bench``: time every op on every backend over a size sweep, against the memory
bandwidth measured in the same run, with the peak extra memory of each case measured in a fresh
process.

Per (op, size, dtype, backend):
  - median, min and interquartile range of the wall time over the timed repetitions, after warm-up;
  - effective GB/s = minimal bytes / median time, where the minimal bytes read every input once
    and write the output once (e.g. uniform average (T+1)·d·elt, TIES (T+2)·d·elt);
  - that rate as a percentage of the STREAM-like read bandwidth measured in the same run;
  - speedup over the reference backend at the same size, TIES time / fused average time, and the
    fused TIES diagnostics (strategy, passes, bracket misses);
  - peak extra resident memory of the first call in a fresh process (see memprobe.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import torch

import fastmerge
from fastmerge import _C
from fastmerge.benchmarks import cases

DEFAULT_SIZES = ("1e5", "1e6", "1e7", "vit")
QUICK_SIZES = ("5e5", "2e6")
# At and above this many elements the reference runs once per op, with no warm-up (a single cold
# call; one reference TIES at ViT-B/32 size takes about a minute and ~16 GB). When memory is
# measured, that single call is the one made in the memory probe, so it is not run twice.
REF_SINGLE_SHOT = 20_000_000
DEFAULT_REF_LIMIT = 20_000_000
REF_CHEAP = 2_000_000  # up to this size the reference always gets its full --ref-reps


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"small run: sizes {' '.join(QUICK_SIZES)} (unless --sizes), fewer repetitions, "
                        "a 256 MiB bandwidth buffer; well under a minute")
    p.add_argument("--ops", nargs="+", metavar="OP", choices=cases.OP_NAMES, default=None,
                   help="ops to run (default: all): " + ", ".join(cases.OP_NAMES))
    p.add_argument("--sizes", nargs="+", metavar="SIZE", default=None,
                   help="element counts such as 1e5, 250k, 2M, 100000, or 'vit' for the model's own size "
                        f"(default: {' '.join(DEFAULT_SIZES)})")
    p.add_argument("--tasks", "-T", type=int, default=8, metavar="T", help="number of task vectors (default 8)")
    p.add_argument("--dtype", nargs="+", choices=tuple(cases.DTYPES), default=["fp32"],
                   help="parameter dtype(s) (default fp32)")
    p.add_argument("--backends", nargs="+", metavar="BACKEND", default=None,
                   help="backends to run (default: every available CPU backend: cpu reference)")
    p.add_argument("--reps", type=int, default=None, metavar="N",
                   help="timed repetitions per case (default: automatic, 5-50 within ~1.5 s per case; "
                        "quick: 3-10). The reference gets at most --ref-reps")
    p.add_argument("--ref-reps", type=int, default=3, metavar="N",
                   help="most timed repetitions of a reference case (default 3); at sizes >= "
                        f"{REF_SINGLE_SHOT:,} the reference always runs once, cold")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed calls before timing each case (default 1; the cpu backend always gets at least 1)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the slow reference backend at large sizes (above --ref-limit); "
                        "use --backends cpu to skip it everywhere")
    p.add_argument("--ref-limit", type=cases.parse_count, default=DEFAULT_REF_LIMIT, metavar="SIZE",
                   help=f"with --no-reference: largest size at which the reference still runs (default {DEFAULT_REF_LIMIT:,})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--memory-mode", choices=("fork", "spawn"), default="fork",
                   help="fresh process per memory case: forked from a clean probe server (default) "
                        "or a new interpreter (spawn, slower)")
    p.add_argument("--json", metavar="PATH", default=None, help="write every figure to this JSON file")
    p.add_argument("--model", default=cases.DEFAULT_MODEL,
                   help=f"open_clip model whose visual tower gives the layout (default {cases.DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--sigma", type=float, default=1e-3,
                   help="fine-tuning noise scale s (per task and tensor s * 2^U(-1,1); default 1e-3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda: time the GPU backends (triton, cuda) against the reference on "
                        "the GPU, with the device-to-device copy bandwidth as the yardstick")
    p.add_argument("--layout-json", metavar="PATH", default=None,
                   help="block offsets (a JSON list from 0 to d) to use instead of building --model's layout")
    p.add_argument("--capability", nargs="+", metavar="CAP", default=None,
                   help="run the cpu backend under each of these kernel builds, side by side: AVX512, AVX2, "
                        "DEFAULT (the baseline build), or 'all' for every one this CPU supports (default: the one "
                        "picked at run time, or FASTMERGE_CPU_CAPABILITY)")
    p.add_argument("--stream-mib", type=int, default=None, metavar="MiB",
                   help="buffer of the bandwidth probe (default 1024, quick 256)")


# ---------------------------------------------------------------------------------------- helpers

class Log:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.open_line = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _prefix(self) -> str:
        return f"[{self.elapsed():7.1f}s] "

    def line(self, msg: str) -> None:
        self.end()
        print(self._prefix() + msg, file=sys.stderr, flush=True)

    def start(self, msg: str) -> None:
        self.end()
        print(self._prefix() + msg + " ...", end="", file=sys.stderr, flush=True)
        self.open_line = True

    def finish(self, msg: str) -> None:
        if self.open_line:
            print(" " + msg, file=sys.stderr, flush=True)
            self.open_line = False
        else:
            self.line(msg)

    def end(self) -> None:
        if self.open_line:
            print(file=sys.stderr, flush=True)
            self.open_line = False


def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s * 1e3 < 100 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def _read_first(path: str, key: str) -> Optional[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.lower().startswith(key.lower()):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    cpu = _read_first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem = _read_first("/proc/meminfo", "MemTotal")  # "24684084 kB"
    mem_bytes = int(mem.split()[0]) * 1024 if mem and mem.split()[0].isdigit() else None
    l3 = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip()  # "32768K"
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:].upper(), 1)
        l3 = int(txt.rstrip("KMGkmg")) * mult
    except (OSError, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    thp = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            txt = f.read().strip()
        thp = txt[txt.index("[") + 1:txt.index("]")] if "[" in txt else txt
    except OSError:
        pass
    caps = _C.cpu_capabilities() if _C is not None else []
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "l3_cache_bytes": l3,
        "mem_total_bytes": mem_bytes,
        "transparent_hugepages": thp,
        "torch": torch.__version__,
        "fastmerge": fastmerge.__version__,
        "cpu_capability": fastmerge.cpu_capability(),
        "cpu_capabilities": list(caps),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def measure_bandwidth(mib: int, reps: int, streams: int = 9) -> dict:
    """STREAM-like read and copy of a buffer far larger than the last-level cache, with the
    extension's probes (threaded like the kernels). Copy counts 2 bytes per byte copied.

    Each read sample is the faster of two reads of the buffer: one stream per thread (the classic
    STREAM read) and `streams` interleaved streams per thread, the way the merge kernels read their
    T + 1 inputs. Some processors draw markedly more bandwidth from several streams (seen: 20 GB/s
    from one, 28 GB/s from nine); taking the faster keeps "% of the read bandwidth" from exceeding
    100 % only because the probe read memory less well than the kernels do."""
    n = mib * 2**20
    streams = max(1, min(64, int(streams)))
    src = torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.fill_(0)  # fault the pages in before timing
    _C.stream_read(src)
    _C.stream_read(src, streams)
    _C.stream_copy(dst, src)
    one, many, copies = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        _C.stream_read(src)
        one.append(n / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        _C.stream_read(src, streams)
        many.append(n / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        _C.stream_copy(dst, src)
        copies.append(2 * n / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return {"buffer_bytes": n, "streams": streams, "read_GBps": [max(a, b) for a, b in zip(one, many)],
            "read_1_stream_GBps": one, "read_n_streams_GBps": many, "copy_GBps": copies}


def summarize_bandwidth(samples: list[dict]) -> dict:
    reads = [x for s in samples for x in s["read_GBps"]]
    copies = [x for s in samples for x in s["copy_GBps"]]
    one = [x for s in samples for x in s.get("read_1_stream_GBps", [])]
    many = [x for s in samples for x in s.get("read_n_streams_GBps", [])]
    return {
        "buffer_bytes": samples[0]["buffer_bytes"],
        "streams": samples[0].get("streams", 1),
        "read_median_GBps": float(np.median(reads)),
        "read_best_GBps": float(max(reads)),
        "read_1_stream_median_GBps": float(np.median(one)) if one else float("nan"),
        "read_n_streams_median_GBps": float(np.median(many)) if many else float("nan"),
        "copy_median_GBps": float(np.median(copies)),
        "copy_best_GBps": float(max(copies)),
        "samples": samples,
        "note": "reference for '% of bandwidth' is read_median_GBps, the median over samples of the faster of a "
                "1-stream and an n-stream read; copy counts read+write bytes (2 per byte copied)",
    }


# Most extra warm-up calls spent waiting for the streaming ops' prefetch tuner to choose (it times
# each way 3 times, so 6 calls settle it).
MAX_SETTLE_CALLS = 8


class PrefetchSettle:
    """Callable: True while the CPU streaming ops are still timing software prefetch on and off and
    the op being warmed up takes part (its last call advanced the tuner). Their first large calls
    alternate the two ways, and must not be counted in a median."""

    def __init__(self):
        self.seen = self._runs()

    @staticmethod
    def _runs() -> int:
        st = fastmerge.cpu_prefetch_state()
        return -1 if st["chosen"] != "tuning" else int(st["runs_off"]) + int(st["runs_on"])

    def __call__(self) -> bool:
        now = self._runs()
        advanced = now > self.seen
        self.seen = now
        return now >= 0 and advanced


def time_calls(fn, warmup: int, reps_for, settle=None) -> tuple[list[float], list[Any], float]:
    """Warm up (`warmup` calls, and more while `settle()` says so, at most MAX_SETTLE_CALLS), then
    time the calls; returns (times, per-call returns if dicts, last warm-up time)."""
    gc.collect()
    warm = None

    def call():
        nonlocal warm
        t0 = time.perf_counter()
        r = fn()
        warm = time.perf_counter() - t0
        del r

    for _ in range(warmup):
        call()
    for _ in range(MAX_SETTLE_CALLS if settle is not None else 0):
        if not settle():
            break
        call()
    reps = reps_for(warm)
    times, extras = [], []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            r = fn()
            times.append(time.perf_counter() - t0)
            if isinstance(r, dict):
                extras.append(r)
            del r
    finally:
        if was:
            gc.enable()
    return times, extras, warm if warm is not None else float("nan")


def auto_reps(fixed: Optional[int], target: float, lo: int, hi: int):
    def reps_for(warm: Optional[float]) -> int:
        if fixed is not None:
            return max(1, fixed)
        if warm is None or not warm > 0:
            return lo
        return int(min(hi, max(lo, math.ceil(target / warm))))
    return reps_for


def stats_of(times: list[float]) -> dict:
    a = np.asarray(times, dtype=np.float64)
    q1, q3 = np.percentile(a, [25, 75])
    return {"median_s": float(np.median(a)), "min_s": float(a.min()), "iqr_s": float(q3 - q1)}


def _inputs_path(scratch: str, nbytes: int, name: str) -> Optional[str]:
    """Where to put the inputs for the memory probes: the scratch folder (in memory where /dev/shm
    exists) if it has room, else the temporary folder; None (regenerate) if neither has."""
    for folder in (scratch, tempfile.gettempdir()):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize > nbytes * 1.2 + 2**30:
            if folder != scratch:
                folder = tempfile.mkdtemp(prefix="fastmerge-bench-", dir=folder)
            return os.path.join(folder, name)
    return None


class ProbeClient:
    """Runs memory probes, each in a fresh process (see memprobe.py)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.proc = None
        if mode == "fork":
            self.proc = subprocess.Popen([sys.executable, "-m", "fastmerge.benchmarks.memprobe", "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            # wait until it has warmed up, so that its start does not overlap the timed cases
            ready = self.proc.stdout.readline()
            if not ready or not json.loads(ready).get("ready"):
                raise RuntimeError("the memory probe server failed to start")

    def run(self, spec: dict) -> dict:
        if self.proc is not None:
            if self.proc.poll() is not None:
                return {"error": f"probe server exited with status {self.proc.returncode}"}
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                return {"error": "probe server closed its output"}
            return json.loads(line)
        r = subprocess.run([sys.executable, "-m", "fastmerge.benchmarks.memprobe"], input=json.dumps(spec),
                           stdout=subprocess.PIPE, text=True)
        lines = [x for x in r.stdout.splitlines() if x.strip()]
        if not lines:
            return {"error": f"probe process exited with status {r.returncode} without a result"}
        return json.loads(lines[-1])

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------------------- run

CAPABILITY_ORDER = ("AVX512", "AVX2", "DEFAULT")


def _capabilities(wanted: Optional[list]) -> list[str]:
    """The kernel builds --capability names, in the order given ('all': every one this CPU runs)."""
    if not wanted:
        return []
    supported = list(_C.cpu_capabilities()) if _C is not None else []
    out: list[str] = []
    for w in wanted:
        for c in ([c for c in CAPABILITY_ORDER if c in supported] if w.lower() == "all" else [w.upper()]):
            if c not in CAPABILITY_ORDER:
                raise SystemExit(f"fastmerge bench: unknown --capability {w!r} (use {', '.join(CAPABILITY_ORDER)} or all)")
            if c not in supported:
                raise SystemExit(f"fastmerge bench: this CPU cannot run the {c} build "
                                 f"(it runs: {', '.join(supported) or 'none'}); FASTMERGE_CPU_ISA decides which are compiled")
            if c not in out:
                out.append(c)
    return out


def is_cpu(backend: str) -> bool:
    """The fused CPU kernels, under the build picked at run time ("cpu") or a named one ("cpu:AVX2")."""
    return backend == "cpu" or backend.startswith("cpu:")


def use_backend(backend: str) -> str:
    """Switches the kernels to the build a "cpu:CAP" backend names; returns the backend to call."""
    if backend.startswith("cpu:"):
        _C.set_cpu_capability(backend.split(":", 1)[1])
        return "cpu"
    return backend


def _resolve(args) -> dict:
    quick = args.quick
    available = fastmerge.available_backends("cpu")
    backends = args.backends or [b for b in ("cpu", "reference") if b in available]
    for b in backends:
        if b not in available:
            raise SystemExit(f"fastmerge bench: backend {b!r} is not available here (available: {', '.join(available)})")
    caps = _capabilities(getattr(args, "capability", None))
    if caps and "cpu" in backends:  # the cpu backend once per build: "cpu:AVX2", "cpu:DEFAULT", ...
        i = backends.index("cpu")
        backends = backends[:i] + [f"cpu:{c}" for c in caps] + backends[i + 1:]
    ops = list(args.ops) if args.ops else list(cases.OP_NAMES)
    ops = [o for o in cases.OP_NAMES if o in ops]  # canonical order
    if args.tasks < 1:
        raise SystemExit("fastmerge bench: --tasks must be >= 1")
    return {
        "quick": quick,
        "backends": [b for b in backends if is_cpu(b)] + [b for b in backends if b == "reference"]
                    + [b for b in backends if not is_cpu(b) and b != "reference"],
        "ops": ops,
        "sizes": list(args.sizes) if args.sizes else list(QUICK_SIZES if quick else DEFAULT_SIZES),
        "T": args.tasks,
        "dtypes": list(dict.fromkeys(args.dtype)),
        "target_s": 0.2 if quick else 1.5,
        "min_reps": 3 if quick else 5,
        "max_reps": 10 if quick else 50,
        "ref_target_s": 0.5 if quick else 4.0,
        "ref_max_reps": 1 if quick else args.ref_reps,
        "stream_mib": args.stream_mib or (256 if quick else 1024),
        "stream_reps": 3 if quick else 5,
    }


def run(args) -> int:
    if getattr(args, "device", "cpu") == "cuda":
        from . import gpu

        return gpu.run_gpu(args)
    log = Log()
    cfg = _resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if _C is None:
        raise SystemExit("fastmerge bench needs the compiled extension (fastmerge._C) for its bandwidth probes")
    info = machine_info()
    log.line(f"fastmerge bench: {info['cpu_model']}, {info['usable_cores']} cores, torch {info['torch']}, "
             f"kernels {info['cpu_capability']}, {threads} threads")

    log.start(f"layout of {args.model}")
    layout = cases.layout_from_args(args)
    log.finish(f"{layout.num_tensors} tensors, d = {layout.numel:,}")

    sizes: list[int] = []
    for tok in cfg["sizes"]:
        d = layout.numel if cases.is_model_token(tok) else cases.parse_count(tok)
        if d not in sizes:
            sizes.append(d)

    T = cfg["T"]
    ops = cfg["ops"]
    backends = cfg["backends"]
    wants_ties = any(cases.OPS[o].is_ties for o in ops)
    aux_avg = wants_ties and "uniform_average" not in ops and any(is_cpu(b) for b in backends)
    picked = fastmerge.cpu_capability()

    def ref_runs(d: int) -> bool:
        return not (args.no_reference and d > args.ref_limit)

    # plan: which cases are timed here and which are measured in a fresh process
    plan = []
    for dt in cfg["dtypes"]:
        for d in sizes:
            for op in ops + (["uniform_average"] if aux_avg else []):
                for be in backends:
                    if be == "reference" and not ref_runs(d):
                        continue
                    aux = op == "uniform_average" and aux_avg
                    if aux and not is_cpu(be):
                        continue
                    plan.append((dt, d, op, be, aux))
    n_time = sum(1 for p in plan if not (p[3] == "reference" and p[1] >= REF_SINGLE_SHOT and not args.no_memory))
    n_mem = 0 if args.no_memory else sum(1 for p in plan if not p[4])
    total_steps = n_time + n_mem
    log.line(f"plan: {len(sizes)} size(s) x {len(ops)} op(s) x {len(backends)} backend(s) x {len(cfg['dtypes'])} dtype(s), "
             f"T = {T}: {n_time} timed case(s), {n_mem} memory probe(s)")

    bw_samples = []
    log.start(f"memory bandwidth ({cfg['stream_mib']} MiB buffer)")
    bw_samples.append(measure_bandwidth(cfg["stream_mib"], cfg["stream_reps"], T + 1))
    log.finish(f"read {np.median(bw_samples[0]['read_GBps']):.1f} GB/s, copy {np.median(bw_samples[0]['copy_GBps']):.1f} GB/s")

    probe = None if args.no_memory else ProbeClient(args.memory_mode)
    scratch = tempfile.mkdtemp(prefix="fastmerge-bench-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    results: list[dict] = []
    aux_rows: dict = {}
    step = 0
    try:
        for dt in cfg["dtypes"]:
            dtype = cases.DTYPES[dt]
            for d in sizes:
                offsets = layout.offsets_for(d)
                label = cases.size_label(d, layout.numel)
                group = [p for p in plan if p[0] == dt and p[1] == d]
                if not group:
                    continue
                need_grad = any(cases.OPS[p[2]].needs_grad for p in group)
                if len(sizes) * len(cfg["dtypes"]) > 1:  # bandwidth drifts on a shared machine: sample it along the run
                    bw_samples.append(measure_bandwidth(cfg["stream_mib"], 3, T + 1))
                log.start(f"inputs d = {d:,} ({label}), T = {T}, {dt}")
                t0 = time.perf_counter()
                x = cases.make_inputs(d, T, dtype, offsets, seed=args.seed, sigma=args.sigma, with_grad=need_grad)
                log.finish(f"{fmt_bytes(x.nbytes())} in {time.perf_counter() - t0:.1f} s")
                rows = {}
                for (_, _, op_name, be, aux) in group:
                    op = cases.OPS[op_name]
                    row = {"op": op_name, "title": op.title, "size": label, "d": d, "T": T, "dtype": dt,
                           "backend": be, "aux": aux, "blocks": len(offsets) - 1,
                           "min_bytes": op.min_bytes(T, d, x.elt),
                           "output_bytes": op.out_bytes(T, d, len(offsets) - 1, x.elt)}
                    rows[(op_name, be)] = row
                    if be.startswith("cpu:"):
                        row["capability"] = be.split(":", 1)[1]
                    elif be == "cpu":
                        row["capability"] = picked
                    if aux:
                        aux_rows[(dt, d, be)] = row  # timed only for the TIES / average ratio
                    else:
                        results.append(row)
                    if be == "reference" and d >= REF_SINGLE_SHOT and not args.no_memory:
                        row["timing"] = "single cold call, in the memory probe"
                        continue  # timed by its memory probe below
                    step += 1
                    log.start(f"({step}/{total_steps}) time {op_name:<21} {label:>7} {dt} {be:<9}")
                    fn = op.bind(x, use_backend(be))
                    if be == "reference":
                        if d >= REF_SINGLE_SHOT:
                            warmup, reps_for = 0, (lambda w: 1)
                            row["timing"] = "single cold call"
                        else:
                            fixed = None if args.reps is None else min(args.reps, args.ref_reps)
                            warmup = max(1, args.warmup)
                            hi = max(1, cfg["ref_max_reps"])
                            lo = hi if d <= REF_CHEAP else 1  # cheap sizes: never judge on one noisy call
                            reps_for = auto_reps(fixed, cfg["ref_target_s"], lo, hi)
                    else:
                        warmup = max(1, args.warmup)
                        reps_for = auto_reps(args.reps, cfg["target_s"], cfg["min_reps"], cfg["max_reps"])
                    settle = PrefetchSettle() if is_cpu(be) else None
                    try:
                        times, extras, warm = time_calls(fn, warmup, reps_for, settle)
                    except Exception as e:  # keep going: the row says what failed
                        row["error"] = f"{type(e).__name__}: {e}"
                        log.finish(f"FAILED: {row['error']}")
                        continue
                    finally:
                        del fn
                    row.update({"warmup": warmup, "reps": len(times), "times_s": times, **stats_of(times)})
                    if extras:
                        for k in extras[0]:
                            row[f"{k}_median_s"] = float(np.median([e[k] for e in extras]))
                    if op.is_ties and is_cpu(be):
                        st = fastmerge.ties_stats()
                        row["ties_stats"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in st.items()}
                    msg = f"median {fmt_time(row['median_s'])} ({len(times)} rep{'s' if len(times) != 1 else ''})"
                    log.finish(msg)
                inputs_file = None
                if probe is not None:  # the probes read these bits instead of regenerating them
                    inputs_file = _inputs_path(scratch, x.nbytes() + x.coefs.nbytes, f"inputs-{dt}-{d}.bin")
                    if inputs_file is not None:
                        cases.dump_inputs(x, inputs_file)
                del x
                gc.collect()
                fastmerge.empty_cache()

                if probe is None:
                    continue
                for (_, _, op_name, be, aux) in group:
                    if aux:
                        continue
                    row = rows[(op_name, be)]
                    step += 1
                    log.start(f"({step}/{total_steps}) mem  {op_name:<21} {label:>7} {dt} {be:<9}")
                    spec = {"op": op_name, "backend": "cpu" if is_cpu(be) else be, "capability": row.get("capability"),
                            "d": d, "T": T, "dtype": dt, "offsets": offsets,
                            "seed": args.seed, "sigma": args.sigma, "threads": threads, "inputs_file": inputs_file}
                    res = probe.run(spec)
                    if "error" in res:
                        row["memory"] = {"error": res["error"]}
                        log.finish(f"FAILED: {res['error']}")
                        if row.get("timing", "").endswith("memory probe"):
                            row["error"] = res["error"]
                        continue
                    row["memory"] = {k: res[k] for k in ("before_bytes", "peak_bytes", "peak_extra_bytes", "output_bytes",
                                                         "first_call_seconds", "method", "inputs_bytes")}
                    out_b = res["output_bytes"]
                    row["memory"]["extra_over_output"] = res["peak_extra_bytes"] / out_b if out_b else None
                    msg = f"peak extra {fmt_bytes(res['peak_extra_bytes'])}"
                    if row.get("timing", "").endswith("memory probe"):
                        t = res["first_call_seconds"]
                        row.update({"warmup": 0, "reps": 1, "times_s": [t], **stats_of([t])})
                        for k, v in (res.get("phases") or {}).items():
                            row[f"{k}_median_s"] = v
                        msg += f", {fmt_time(t)} (single cold call)"
                    log.finish(msg)
                if inputs_file is not None:
                    os.remove(inputs_file)
                    if os.path.dirname(inputs_file) != scratch:
                        shutil.rmtree(os.path.dirname(inputs_file), ignore_errors=True)
    finally:
        if probe is not None:
            probe.close()
        shutil.rmtree(scratch, ignore_errors=True)
        _C.set_cpu_capability(picked)
        log.end()

    log.start("memory bandwidth again (end of run)")
    bw_samples.append(measure_bandwidth(cfg["stream_mib"], cfg["stream_reps"], T + 1))
    log.finish(f"read {np.median(bw_samples[-1]['read_GBps']):.1f} GB/s, copy {np.median(bw_samples[-1]['copy_GBps']):.1f} GB/s")
    bw = summarize_bandwidth(bw_samples)

    # derived figures
    by_key = {}
    for r in results:
        by_key[(r["dtype"], r["d"], r["op"], r["backend"])] = r
    for r in results:
        if "median_s" not in r:
            continue
        r["GBps"] = r["min_bytes"] / r["median_s"] / 1e9
        r["pct_read_bw"] = 100.0 * r["GBps"] / bw["read_median_GBps"]
        ref = by_key.get((r["dtype"], r["d"], r["op"], "reference"))
        if r["backend"] != "reference" and ref is not None and "median_s" in ref:
            r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
    for r in results:
        if cases.OPS[r["op"]].is_ties and "median_s" in r:
            # the average of the same build (the first cpu build for the reference's rows)
            be = r["backend"] if is_cpu(r["backend"]) else next((b for b in backends if is_cpu(b)), "cpu")
            avg = by_key.get((r["dtype"], r["d"], "uniform_average", be)) or aux_rows.get((r["dtype"], r["d"], be))
            if avg is not None and "median_s" in avg:
                r["fused_average_median_s"] = avg["median_s"]
                r["ratio_to_fused_average"] = r["median_s"] / avg["median_s"]

    total = log.elapsed()
    info["streaming_prefetch"] = fastmerge.cpu_prefetch_state()
    report = {
        "machine": info,
        "config": {
            "ops": ops, "sizes": sizes, "T": T, "dtypes": cfg["dtypes"], "backends": backends, "quick": cfg["quick"],
            "reps": args.reps, "ref_reps": args.ref_reps, "warmup": args.warmup, "threads": threads,
            "seed": args.seed, "sigma": args.sigma, "capabilities": [b.split(":", 1)[1] for b in backends if b.startswith("cpu:")],
            "base_std": 0.02, "ties": {"density": cases.TIES_DENSITY,
            "lam": cases.TIES_LAM, "merge": "mean"}, "task_arithmetic_lam": cases.TA_LAM,
            "memory": None if args.no_memory else args.memory_mode,
            "no_reference": args.no_reference, "ref_limit": args.ref_limit, "ref_single_shot": REF_SINGLE_SHOT,
        },
        "layout": {"model": layout.name, "tensors": layout.num_tensors, "numel": layout.numel},
        "bandwidth": bw,
        "results": results,
        "total_seconds": total,
    }
    print(render(report))
    print(f"\ntotal wall time: {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log.line(f"wrote {args.json}")
    failed = [r for r in results if "error" in r]
    return 1 if failed else 0



# ---------------------------------------------------------------------------------------- table

COLUMNS = [  # header, alignment
    ("size", "<"), ("op", "<"), ("backend", "<"), ("reps", ">"), ("median", ">"), ("min", ">"), ("IQR", ">"),
    ("GB/s", ">"), ("%read", ">"), ("vs ref", ">"), ("peak extra", ">"), ("x out", ">"), ("notes", "<"),
]


def _row_cells(r: dict) -> list[str]:
    mem = r.get("memory") or {}
    if "error" in mem:
        peak, xo = "FAILED", "-"
    elif mem:
        peak = fmt_bytes(mem["peak_extra_bytes"])
        xo = f"{mem['extra_over_output']:.2f}" if mem.get("extra_over_output") is not None and mem["output_bytes"] >= 2**20 else "-"
    else:
        peak, xo = "-", "-"
    notes = []
    if "error" in r:
        notes.append("FAILED: " + r["error"][:60])
    if "ratio_to_fused_average" in r:
        notes.append(f"{r['ratio_to_fused_average']:.2f}x avg")
    st = r.get("ties_stats")
    if st:
        notes.append(f"{st.get('strategy')}, {st.get('passes')} pass{'es' if st.get('passes') != 1 else ''}, "
                     f"{st.get('bracket_misses')} miss{'es' if st.get('bracket_misses') != 1 else ''}")
    if "forward_median_s" in r:
        notes.append(f"fwd {fmt_time(r['forward_median_s'])} + bwd {fmt_time(r['backward_median_s'])}")
    if r.get("timing"):
        notes.append(r["timing"].replace(", in the memory probe", " (probe)"))
    has = "median_s" in r
    return [
        r["size"], r["op"], r["backend"],
        str(r.get("reps", "-")) if has else "-",
        fmt_time(r.get("median_s")), fmt_time(r.get("min_s")), fmt_time(r.get("iqr_s")) if has and r.get("reps", 0) >= 2 else "-",
        f"{r['GBps']:.1f}" if "GBps" in r else "-",
        f"{r['pct_read_bw']:.0f}%" if "pct_read_bw" in r else "-",
        f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-",
        peak, xo, "; ".join(notes),
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, (h, _) in enumerate(COLUMNS)]
    widths[-1] = 0  # notes: no padding

    def fmt(cells):
        out = []
        for (h, al), w, c in zip(COLUMNS, widths, cells):
            out.append(c.ljust(w) if al == "<" else c.rjust(w))
        return "  ".join(out).rstrip()

    lines = [fmt([h for h, _ in COLUMNS])]
    lines.append("-" * len(lines[0]))
    prev = None
    for c in rows:
        if prev is not None and c[0] != prev:
            lines.append("")
        prev = c[0]
        lines.append(fmt(c))
    return lines


def _prefetch_line(p: dict) -> str:
    if p["mode"] != "auto":
        return f"prefetch  : streaming ops' software prefetch {p['chosen']} (FASTMERGE_CPU_PREFETCH)"
    return (f"prefetch  : streaming ops' software prefetch {p['chosen']}, chosen by timing both ways "
            f"(best {p['best_ns_per_byte_on']:.4f} ns/B on, {p['best_ns_per_byte_off']:.4f} ns/B off)")


def render(report: dict) -> str:
    m, cfg, bw, lay = report["machine"], report["config"], report["bandwidth"], report["layout"]
    n_read = sum(len(s["read_GBps"]) for s in bw["samples"])
    out = [
        f"fastmerge bench  ({m['date']})",
        f"machine   : {m['cpu_model']}; {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
        f"L3 {fmt_bytes(m['l3_cache_bytes'])}, RAM {fmt_bytes(m['mem_total_bytes'])}, "
        f"transparent huge pages: {m['transparent_hugepages']}",
        f"software  : torch {m['torch']}, fastmerge {m['fastmerge']}, CPU kernels "
        + (f"{', '.join(cfg['capabilities'])} side by side (picked at run time: {m['cpu_capability']}; "
           if cfg.get("capabilities") else f"{m['cpu_capability']} (")
        + f"this CPU: {', '.join(m['cpu_capabilities'])}), Python {m['python']}, {cfg['threads']} torch threads",
        *([_prefetch_line(m["streaming_prefetch"])] if m.get("streaming_prefetch") else []),
        f"bandwidth : read {bw['read_median_GBps']:.1f} GB/s (best {bw['read_best_GBps']:.1f}; each sample the "
        f"faster of 1 stream, median {bw.get('read_1_stream_median_GBps', float('nan')):.1f}, and "
        f"{bw.get('streams', 1)} interleaved streams, median {bw.get('read_n_streams_median_GBps', float('nan')):.1f}), "
        f"copy {bw['copy_median_GBps']:.1f} GB/s (best {bw['copy_best_GBps']:.1f});",
        f"            STREAM-like probes, {bw['buffer_bytes'] // 2**20} MiB buffer, {n_read} samples each along the "
        f"run; copy = 2 x bytes / time",
        f"layout    : {lay['model']}: {lay['tensors']} tensors, d = {lay['numel']:,} (size marked *); "
        f"other sizes: the same {lay['tensors']} blocks scaled to d",
        f"data      : T = {cfg['T']}; base ~ N(0, {cfg['base_std']}), theta_t = base + N(0, s) with "
        f"s = {cfg['sigma']:g} * 2^U(-1,1) per task and tensor; seed {cfg['seed']}",
        f"ops       : TIES density {cfg['ties']['density']}, lam {cfg['ties']['lam']:g}, merge {cfg['ties']['merge']}; "
        f"task arithmetic lam {cfg['task_arithmetic_lam']}; merge_ties_tensor and block_scale use one block per tensor",
    ]
    order_op = {o: i for i, o in enumerate(cases.OP_NAMES)}
    order_be = {b: i for i, b in enumerate(cfg["backends"])}
    for dt in cfg["dtypes"]:
        rows = [r for r in report["results"] if r["dtype"] == dt]
        rows.sort(key=lambda r: (r["d"], order_op.get(r["op"], 99), order_be.get(r["backend"], 99), r["backend"]))
        out.append("")
        out.append(f"== {dt}, T = {cfg['T']} ==")
        out.extend(_table([_row_cells(r) for r in rows]))
    out += [
        "",
        "median/min/IQR: wall time of one call over the timed reps, after warm-up (reference: at most "
        f"{cfg['ref_reps']} reps; at d >= {cfg['ref_single_shot']:,} one cold call, made in the memory probe's process).",
        "GB/s: minimal bytes / median; minimal bytes read each input once and write the output once: average (T+1)d, "
        "task arithmetic, TIES, block_scale fwd (T+2)d, cosine and block_scale bwd (T+1)d, fwd+bwd (2T+3)d elements.",
        "%read: GB/s as a share of the read bandwidth above (over 100% where the inputs fit in the last-level cache). "
        "vs ref: reference median / this median, same size.",
        "peak extra: peak RSS during the first call at that size in a fresh process minus RSS with the inputs built "
        "(kernel high-water mark); x out: peak extra / output size (outputs under 1 MiB: -).",
        "Nx avg (TIES): median / the fused (cpu) uniform_average median on the same inputs, same kernel build.",
        "cpu:CAP: the fused kernels forced to one instruction-set build (--capability); plain cpu: the build "
        "picked at run time, named on the software line.",
    ]
    return "\n".join(out)
