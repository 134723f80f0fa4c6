"""Peak-memory probe: one (op, size, backend) case in a fresh process, first call only.

The process builds the inputs, notes its resident set size (VmRSS), resets the kernel's high-water
mark (writing "5" to /proc/self/clear_refs), makes exactly one call, and reads the high-water mark
(VmHWM) back: peak extra = VmHWM - VmRSS before the call. The high-water mark is tracked by the
kernel, so short-lived temporaries that were freed before the call returned are counted. Where
clear_refs cannot be written, a sampling thread and getrusage's ru_maxrss stand in (the JSON says
which method was used).

It is the first call at that size in the process, so the fused kernels' cache of output blocks is
empty and the output is allocated for real, as in a user's first merge. Before it, one call of the
same op on a tiny input (4096 elements, far below the cached block size) loads the code paths that
a process imports lazily on its first op call, so that one-time cost is not charged to the op.

Two ways to get a fresh process:
  python -m fastmerge.benchmarks.memprobe < spec.json     one case (spawn: a new interpreter)
  python -m fastmerge.benchmarks.memprobe --serve          JSON lines on stdin -> JSON lines on
      stdout; each case runs in a child forked from this server, which has imported torch and
      fastmerge but never allocated data or run a kernel (saves the interpreter start per case).

Spec keys: op, backend, capability (kernel build, optional), d, T, dtype ("fp32"/"bf16"/"fp16"),
offsets, seed, sigma, threads, and optionally inputs_file (inputs written by cases.dump_inputs, read instead of regenerated).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time
import traceback

import torch

import fastmerge
from fastmerge.benchmarks import cases

PAGE = os.sysconf("SC_PAGE_SIZE")
WARM_D = 4096  # elements of the warm-up call (16 KiB per fp32 vector)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return hwm_bytes() <= rss_bytes() + 64 * PAGE


class _Sampler(threading.Thread):
    """Fallback: polls VmRSS (only sees the call while it releases the GIL)."""

    def __init__(self, period: float = 5e-4):
        super().__init__(daemon=True)
        self.period = period
        self.peak = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, rss_bytes())


def run_case(spec: dict) -> dict:
    """Measure one case in this (fresh) process; returns a JSON-able dict."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    op = cases.OPS[spec["op"]]
    backend = spec["backend"]
    dtype = cases.DTYPES[spec["dtype"]]
    if spec.get("capability") and backend == "cpu":  # the kernel build the parent timed
        from fastmerge import _C

        _C.set_cpu_capability(spec["capability"])
    # One call on a tiny input first: the first call of any op in a process imports lazily loaded
    # torch modules (~0.9 s and ~150 MiB of RSS here), which is not the op's memory. Its output is
    # far below the size the fused kernels cache, so the measured call below still allocates its
    # output for real.
    tiny = cases.make_inputs(WARM_D, int(spec["T"]), dtype, [0, WARM_D // 2, WARM_D], with_grad=op.needs_grad)
    tiny_fn = op.bind(tiny, backend)
    tiny_fn()
    del tiny, tiny_fn
    t0 = time.perf_counter()
    if spec.get("inputs_file"):  # the parent's inputs, bit for bit
        x = cases.load_inputs(spec["inputs_file"], int(spec["d"]), int(spec["T"]), dtype, spec["offsets"],
                              with_grad=op.needs_grad)
    else:
        x = cases.make_inputs(int(spec["d"]), int(spec["T"]), dtype, spec["offsets"], seed=int(spec.get("seed", 0)),
                              sigma=float(spec.get("sigma", 1e-3)), with_grad=op.needs_grad)
    build_s = time.perf_counter() - t0
    fn = op.bind(x, backend)
    gc.collect()
    gc.disable()
    before = rss_bytes()
    exact = reset_hwm()
    sampler = None
    if not exact:
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampler = _Sampler()
        sampler.start()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    if exact:
        peak = hwm_bytes()
        method = "VmHWM after clear_refs reset"
    else:
        peak = sampler.stop()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > maxrss_before:  # the call set a new lifetime peak: that is exact
            peak = max(peak, maxrss)
        method = "VmRSS sampling + ru_maxrss (may under-report)"
    out = {
        "op": op.name,
        "backend": backend,
        "d": x.d,
        "T": x.T,
        "dtype": spec["dtype"],
        "inputs_bytes": x.nbytes(),
        "build_seconds": build_s,
        "before_bytes": before,
        "peak_bytes": peak,
        "peak_extra_bytes": max(0, peak - before),
        "output_bytes": op.out_bytes(x.T, x.d, x.num_blocks, x.elt),
        "first_call_seconds": elapsed,
        "method": method,
        "pid": os.getpid(),
    }
    if op.phases and isinstance(result, dict):
        out["phases"] = result
    if op.is_ties and backend == "cpu":
        out["ties_stats"] = _jsonable(fastmerge.ties_stats())
    del result
    gc.enable()
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def _safe_run(spec: dict) -> dict:
    try:
        return run_case(spec)
    except BaseException as e:  # reported to the parent, which shows it in the table
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory?)" if sig == 9 else ""
        return f"probe process died from signal {sig}{hint}"
    return f"probe process exited with status {os.WEXITSTATUS(status)} without a result"


def _fork_case(spec: dict) -> dict:
    r, w = os.pipe()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: a fresh address space as far as data and kernel caches go
        os.close(r)
        code = 0
        try:
            payload = json.dumps(_safe_run(spec))
            with os.fdopen(w, "w") as f:
                f.write(payload)
        except BaseException:
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": _describe_status(status)}
    return json.loads(data)


def warm_server() -> None:
    """Load the lazily imported code paths of every op once, in the server, so that each forked
    child starts with them loaded. It runs single-threaded (no OpenMP worker threads exist when the
    server forks) on tiny inputs whose outputs are far below the fused kernels' cached block size
    (the output cache stays empty)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = cases.make_inputs(WARM_D, 2, torch.float32, [0, WARM_D // 2, WARM_D], with_grad=True)
        for op in cases.OPS.values():
            for be in fastmerge.available_backends("cpu"):
                op.bind(x, be)()
        del x
        gc.collect()
        gc.freeze()  # children's gc passes then skip (and do not copy-on-write) the server's objects
    finally:
        torch.set_num_threads(n)


def serve() -> int:
    # keep stdout for the protocol only: anything else printed goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    warm_server()
    proto.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")  # the client waits for this
    proto.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as e:
            res = {"error": f"bad spec: {e}"}
        else:
            res = _fork_case(spec)
        proto.write(json.dumps(res) + "\n")
        proto.flush()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        return serve()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    text = argv[0] if argv else sys.stdin.read()
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    res = _safe_run(json.loads(text))
    proto.write(json.dumps(res) + "\n")
    proto.flush()
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    raise SystemExit(main())
