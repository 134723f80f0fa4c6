"""``fastmerge bench --device cuda``: the ops on a GPU, both GPU backends against the reference.

Per (op, size, backend): median time over CUDA-event-timed calls, effective bandwidth (the op's
minimal bytes, see ``cases.OPS``, over the median), % of the device-to-device copy bandwidth
measured in the same run (bytes read + written), speedup over the reference op, and the peak extra
device memory of one call (``torch.cuda.max_memory_allocated`` above what was allocated before it,
output included). The first calls of a Triton kernel autotune it; they are warm-up, never timed.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import fastmerge
from fastmerge import _ops

from . import cases

GPU_OPS = ("uniform_average", "task_arithmetic", "task_vector_cosine", "block_scale", "block_scale_backward",
           "merge_ties", "merge_ties_tensor")
REF_MAX_BYTES_FRACTION = 0.45  # run the reference only where its stacked copies fit comfortably


def make_inputs_cuda(d: int, T: int, dtype: torch.dtype, offsets, *, seed: int = 0, sigma: float = 1e-3,
                     base_std: float = 0.02, device="cuda") -> cases.Inputs:
    """The synthetic inputs of ``cases.make_inputs`` (same model: base + per-task, per-tensor
    scaled noise), drawn with the GPU's generator so that 88 M × 9 values take milliseconds."""
    g = torch.Generator(device=device).manual_seed(seed)
    offs = torch.tensor([int(o) for o in offsets], dtype=torch.int64)
    nb = offs.numel() - 1
    sizes = (offs[1:] - offs[:-1]).to(device)
    base = torch.empty(d, dtype=torch.float32, device=device).normal_(0.0, base_std, generator=g)
    scales = sigma * torch.exp2(torch.empty(T, nb, dtype=torch.float32, device=device).uniform_(-1, 1, generator=g))
    thetas = []
    for t in range(T):
        x = torch.empty(d, dtype=torch.float32, device=device).normal_(0.0, 1.0, generator=g)
        x.mul_(torch.repeat_interleave(scales[t], sizes, output_size=d)).add_(base)
        thetas.append(x if dtype == torch.float32 else x.to(dtype))
    coefs = (0.3 + 0.05 * torch.randn(T, nb, generator=g, device=device)).float()
    grad = torch.empty(d, dtype=torch.float32, device=device).normal_(0.0, 1.0, generator=g).to(dtype)
    return cases.Inputs(d, T, dtype, base.to(dtype), thetas, offs, coefs, grad)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> dict:
    """Device-to-device copy: bytes read + written per second (median of ``reps``)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    med = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": 2 * n * 4, "median_s": med, "gbps": 2 * n * 4 / med / 1e9}


def time_gpu(fn, warmup: int, max_reps: int, budget_s: float) -> list[float]:
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    del out
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
        del out
    return times


def peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def run_gpu(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("fastmerge bench --device cuda: no CUDA device is available")
    avail = fastmerge.available_backends("cuda")
    backends = args.backends or [b for b in ("triton", "cuda", "reference") if b in avail]
    for b in backends:
        if b not in avail:
            raise SystemExit(f"fastmerge bench: backend {b!r} is not available on CUDA here (available: {', '.join(avail)})")
    ops = [o for o in (args.ops or GPU_OPS) if o in GPU_OPS]
    layout = cases.layout_from_args(args)
    sizes = [layout.numel if cases.is_model_token(s) else cases.parse_count(s)
             for s in (args.sizes or (["1M", "vit"] if args.quick else ["vit", "1e6", "1e7"]))]
    T = args.tasks
    dtypes = [cases.DTYPES[d] for d in args.dtype]
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}; backends {', '.join(backends)}", flush=True)
    bw = copy_bandwidth(256 << 20 if args.quick else 2 << 30)
    print(f"device-to-device copy: {bw['gbps']:.0f} GB/s (read + write, median)", flush=True)
    results = []
    for dt in dtypes:
        for d in sizes:
            offsets = layout.offsets_for(d)
            x = make_inputs_cuda(d, T, dt, offsets, seed=args.seed, sigma=args.sigma)
            elt = x.elt
            in_bytes = x.base.nbytes * (T + 1)
            for op in ops:
                spec = cases.OPS[op]
                if spec.needs_grad and x.grad is None:
                    continue
                for be in backends:
                    if be == "reference" and in_bytes * (3 if op.startswith("merge_ties") else 2) > \
                            REF_MAX_BYTES_FRACTION * props.total_memory * (T + 1) / T:
                        continue
                    fn = spec.bind(x, be)
                    is_ref = be == "reference"
                    try:
                        warm = args.warmup if args.warmup is not None and args.warmup > 1 else (1 if is_ref else 3)
                        reps = (args.ref_reps if is_ref else args.reps) or (3 if is_ref else 50)
                        times = time_gpu(fn, warmup=warm, max_reps=reps, budget_s=0.5 if is_ref else 2.0)
                        mem = None if args.no_memory else peak_extra(fn)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"{op:22s} {be:9s} d={d:,}: out of memory", flush=True)
                        continue
                    except Exception as e:  # report and go on with the other cases
                        print(f"{op:22s} {be:9s} d={d:,}: FAILED {type(e).__name__}: {e}", flush=True)
                        results.append({"op": op, "backend": be, "d": d, "error": f"{type(e).__name__}: {e}"})
                        continue
                    med = statistics.median(times)
                    mb = spec.min_bytes(T, d, elt)
                    r = {"op": op, "backend": be, "d": d, "T": T, "dtype": str(dt).replace("torch.", ""),
                         "reps": len(times), "median_s": med, "min_s": min(times), "gbps": mb / med / 1e9,
                         "pct_copy_bw": 100 * mb / med / (bw["gbps"] * 1e9), "peak_extra_bytes": mem,
                         "out_bytes": spec.out_bytes(T, d, x.num_blocks, elt)}
                    if op.startswith("merge_ties") and be == "triton":
                        r["ties_path"] = _ops.triton_kernels().ties_last_stats().get("path")
                    results.append(r)
                    print(f"{op:22s} {be:9s} d={d:>11,} {r['dtype']:8s} {med * 1e3:9.3f} ms  {r['gbps']:7.0f} GB/s "
                          f"{r['pct_copy_bw']:5.1f} %  extra {'' if mem is None else f'{mem / 2**20:8.1f} MiB'}"
                          f"  (n={len(times)})", flush=True)
                    torch.cuda.empty_cache()
            del x
            torch.cuda.empty_cache()
    # speedups over the reference and TIES / average
    results_ok = [r for r in results if "error" not in r]
    by = {(r["dtype"], r["d"], r["op"], r["backend"]): r for r in results_ok}
    for r in results_ok:
        ref = by.get((r["dtype"], r["d"], r["op"], "reference"))
        if ref is not None and r["backend"] != "reference":
            r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
        if r["op"] == "merge_ties":
            avg = by.get((r["dtype"], r["d"], "uniform_average", r["backend"]))
            if avg is not None:
                r["ties_over_average"] = r["median_s"] / avg["median_s"]
    print("\nsummary (speedup over the reference op at the same size; TIES time / average time):")
    for r in results_ok:
        extra = []
        if "speedup_vs_reference" in r:
            extra.append(f"{r['speedup_vs_reference']:.1f}x reference")
        if "ties_over_average" in r:
            extra.append(f"{r['ties_over_average']:.2f}x average")
        if extra:
            print(f"  {r['op']:22s} {r['backend']:8s} d={r['d']:,}: " + ", ".join(extra))
    report = {"device": props.name, "copy_bandwidth": bw, "torch": torch.__version__, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
