"""Running a planned merge: prefetching reads, the per-tensor kernels, streaming shard writes, and an
output folder that appears only when the merge is complete."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import methods as M
from . import reference as R
from .config import ConfigError, MergeConfig, load_config
from .io import DTYPE_NAMES, CheckpointError, ShardWriter, copy_files, parse_size
from .plan import Item, Plan, build_plan
from .rng import stream_key
from .select import pick

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model", "chat_template.jinja",
                   "generation_config.json")
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.float64: "float64"}


PREFETCH_BYTES = 64 << 20  # input bytes faulted in ahead, shared by the prefetched tensors


class MergeError(RuntimeError):
    """A merge that failed while running; nothing was left in the output folder."""


class MergeInterrupted(MergeError):
    pass


@dataclass
class MergeOptions:
    out_shard_size: int = 5 * 1000 ** 3
    random_seed: Optional[int] = None
    copy_tokenizer: bool = True
    write_model_card: bool = True
    device: str = "cpu"
    allow_crimes: bool = False
    threads: Optional[int] = None
    overwrite: bool = False
    quiet: bool = False
    progress: Optional[bool] = None  # None: a bar when stderr is a terminal
    prefetch: int = 2  # tensors read ahead
    reference: bool = False  # run the pure-PyTorch twins (verification)


@dataclass
class MergeResult:
    out_dir: str
    tensors: int
    in_bytes: int
    out_bytes: int
    seconds: float
    shards: List[str]
    method: str
    notes: List[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.in_bytes / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        return (f"merged {self.tensors} tensors with {self.method}: {self.in_bytes / 1e9:.2f} GB read, "
                f"{self.out_bytes / 1e9:.2f} GB written in {self.seconds:.2f} s ({self.gbps:.2f} GB/s) -> {self.out_dir}")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe(plan: Plan, opts: MergeOptions) -> str:
    """The dry-run report: inputs, tensors, bytes, and the memory the merge will need."""
    lines = [f"method: {plan.method.name} ({plan.method.notes})"] + [f"warning: {w}" for w in plan.warnings]
    for m, f in plan.folders.items():
        ck = plan.checkpoints[m]
        lines.append(f"model {m}: {f} ({len(ck.tensors)} tensors, {_fmt_bytes(ck.nbytes)})")
    n_copy = sum(1 for i in plan.items if i.copy)
    lines.append(f"output tensors: {len(plan.items)} ({n_copy} copied non-float buffers)")
    if plan.layers_out:
        lines.append("layers: " + ", ".join(f"{k.rstrip('.')} x {v}" for k, v in plan.layers_out.items()))
    from .io import plan_shards

    shards = plan_shards(plan.out_tensors(), opts.out_shard_size)
    lines.append(f"bytes read: {_fmt_bytes(plan.in_bytes)}; bytes written: {_fmt_bytes(plan.out_bytes)} in "
                 f"{len(shards)} shard(s) of at most {_fmt_bytes(opts.out_shard_size)}")
    from .io import ShardWriter
    from .methods import CHUNK

    peak = plan.peak_bytes(PREFETCH_BYTES if opts.prefetch else 0, ShardWriter.PIECE * ShardWriter.QUEUE, CHUNK)
    lines.append(f"memory needed: about {_fmt_bytes(peak)} for tensors (the inputs of the largest chunk in flight, "
                 f"temporaries, prefetched inputs and output waiting for the disk), plus the Python and PyTorch "
                 f"runtime (about 0.6 GB with a CUDA build of torch)")
    big = max(plan.items, key=lambda i: i.in_bytes)
    lines.append(f"largest tensor: {big.out_name} {list(big.shape)} ({_fmt_bytes(big.in_bytes)} of inputs)")
    return "\n".join(lines)


class _Progress:
    def __init__(self, total_bytes: int, n: int, enabled: bool):
        self.bar = None
        self.start = time.perf_counter()
        self.done = 0
        self.n = n
        self.count = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.count}/{self.n} tensors", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _job(plan: Plan, item: Item, seed: Optional[int], device: torch.device, fast: bool) -> M.Job:
    def get(ref):
        x = plan.checkpoints[ref[0]].get(ref[1])
        if plan.config.dtype is not None and x.dtype != plan.config.dtype and x.is_floating_point():
            x = x.to(plan.config.dtype)
        return x.to(device) if device.type != "cpu" else x

    keys = [stream_key(seed or 0, m, n) for m, n in item.inputs]
    return M.Job(item.out_name, get(item.base) if item.base else None, [get(r) for r in item.inputs], item.shared,
                 item.per, keys, item.out_dtype, fast)


def _name_nonfinite(plan: Plan, item: Item, job: M.Job) -> str:
    refs = ([item.base] if item.base else []) + item.inputs
    tensors = ([job.base] if job.base is not None else []) + job.inputs
    for ref, x in zip(refs, tensors):
        i = R.nonfinite_index(x)
        if i is not None:
            v = x.reshape(-1)[i].item()
            return (f"model {ref[0]}: tensor {ref[1]} holds {v} at flat index {i}; the checkpoint is corrupt: "
                    f"re-download or repair it")
    return (f"tensor {item.out_name}: the merge overflowed to a non-finite value (finite inputs); lower the weights "
            f"or lambda, or merge in float32 (dtype: float32)")


def global_thresholds(plan: Plan, fast: bool) -> Optional[List[int]]:
    """``ties`` with ``scope: global``: each model's exact magnitude threshold over all of its tensors.

    Two streaming passes over the inputs, each summing per-model histograms of the float32 bits of
    |delta| (the top 16 bits, then the low 16 bits inside the bin that holds the rank), so the memory is
    O(models x 65536) whatever the model size. With ``fast=False`` the reference concatenates every
    |delta| and takes a kthvalue (verification only)."""
    items = [it for it in plan.items if not it.copy]
    scopes = {it.shared.get("scope", "tensor") for it in items}
    if "global" not in scopes:
        return None
    if scopes != {"global"}:
        raise ConfigError("scope: global must apply to every tensor (do not filter or grade 'scope')")
    models = [m for m, _ in items[0].inputs]
    if plan.config.uses_slices or any([m for m, _ in it.inputs] != models for it in items):
        raise ConfigError("scope: global needs a models: config (every tensor merged from the same models)")
    dens = []
    for t, m in enumerate(models):
        ds = {it.per[t]["density"] for it in items}
        if len(ds) > 1:
            raise ConfigError(f"model {m}: scope: global needs one density per model, got {sorted(ds)}; "
                              f"remove the gradient or filters from density")
        dens.append(ds.pop())
    N = sum(math.prod(it.shape) for it in items)
    ranks = [N - max(1, int(d * N)) for d in dens]  # 0-based ascending rank of the k-th largest
    if not fast:
        deltas = [[] for _ in models]
        for it in items:
            job = _job(plan, it, None, torch.device("cpu"), False)
            for t, x in enumerate(job.inputs):
                deltas[t].append(R.work(x).reshape(-1) - R.work(job.base).reshape(-1))
        return [R.global_threshold(ds, d) if d < 1 else 0 for ds, d in zip(deltas, dens)]
    from .._ops import _C

    T = len(models)

    def hist(prefix):
        h = torch.zeros(T, 1 << 16, dtype=torch.int64)
        for it in items:
            job = _job(plan, it, None, torch.device("cpu"), True)
            flat = M._common([job.base] + job.inputs)
            h += _C.ckpt_key_hist(flat[0], flat[1:], prefix)[0]
            del job, flat
            for m, name in [it.base] + it.inputs:
                plan.checkpoints[m].release(name)
        return h

    h1 = hist([-1] * T)
    coarse = [pick(h1[t], ranks[t]) for t in range(T)]
    h2 = hist([c[0] for c in coarse])
    keys = []
    for t in range(T):
        d = pick(h2[t], ranks[t] - coarse[t][1])[0]
        keys.append(0 if dens[t] >= 1 else (coarse[t][0] << 16) | d)
    return keys


def _merge_one(plan: Plan, item: Item, seed: Optional[int], device: torch.device, fast: bool,
               thresholds: Optional[List[int]] = None, sink=None) -> Optional[torch.Tensor]:
    """The merged tensor, or None when the fused path handed it to ``sink`` in pieces."""
    job = _job(plan, item, seed, device, fast)
    job.thresholds = thresholds
    job.sink = sink
    refs = ([item.base] if item.base else []) + item.inputs
    if device.type == "cpu" and plan.config.dtype is None:
        def release(a: int, b: int) -> None:
            for m, n in refs:
                plan.checkpoints[m].release(n, a, b)

        job.release = release
    if item.copy:
        return job.inputs[0].to("cpu")
    try:
        out = plan.method.run(job)
    except ValueError as e:
        if "non-finite" in str(e) or "overflowed" in str(e):
            raise MergeError(_name_nonfinite(plan, item, job)) from None
        raise MergeError(f"tensor {item.out_name}: {e}") from None
    if out is None:
        return None
    if not (plan.method.gta or plan.method.name == "linear") or not M._fused(job, job.inputs[0]):
        # methods without a fused pass: check their output (one read of it); a NaN input reaches it
        if not bool(torch.isfinite(out).all()):
            raise MergeError(_name_nonfinite(plan, item, job))
    return out.to("cpu")


def _output_files(plan: Plan, tmp: str, opts: MergeOptions, result_dtype: torch.dtype) -> List[str]:
    cfg = plan.config
    base_folder = plan.folders[plan.reference_model]
    written = []
    src_cfg = os.path.join(base_folder, "config.json")
    if os.path.exists(src_cfg):
        with open(src_cfg) as f:
            mc = json.load(f)
        name = TORCH_DTYPE_NAMES.get(result_dtype, str(result_dtype).replace("torch.", ""))
        mc["torch_dtype"] = name  # the key transformers 4 reads
        mc["dtype"] = name  # and transformers 5
        if cfg.uses_slices and "num_hidden_layers" in mc and plan.layers_out:
            mc["num_hidden_layers"] = next(iter(plan.layers_out.values()))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(mc, f, indent=2)
            f.write("\n")
        written.append("config.json")
    if opts.copy_tokenizer:
        ts = cfg.tokenizer_source
        src = plan.folders.get(ts) if ts not in (None, "base") else base_folder
        if ts not in (None, "base") and src is None:
            from .io import resolve_model

            src = resolve_model(ts, cfg.base_dir)
        written += copy_files(src, tmp, TOKENIZER_FILES)
    with open(os.path.join(tmp, "mergekit_config.yml"), "w") as f:
        f.write(cfg.to_yaml())
    written.append("mergekit_config.yml")
    if opts.write_model_card:
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(plan))
        written.append("README.md")
    return written


def model_card(plan: Plan) -> str:
    cfg = plan.config
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- fastmerge"]
    bases = [cfg.base_model] if cfg.base_model else []
    if bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["---", "", "# Merged model", "",
              f"This model was merged with fastmerge using the **{plan.method.name}** method "
              f"({plan.method.notes}).", "", "## Models merged", ""]
    for m in cfg.models():
        lines.append(f"- {m}" + (" (base)" if m == cfg.base_model else ""))
    lines += ["", "## Configuration", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _return_large_buffers_to_the_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, unmapped when freed.

    The merge allocates and frees buffers of up to 16 MB per chunk. By default glibc raises its mmap
    threshold as such blocks are freed and then keeps them in the heap, so the resident memory would grow
    with the largest tensors seen (by about 0.25 GB at 1B parameters per model). A fixed threshold keeps
    the peak near the live buffers. Elsewhere than glibc this does nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


def merge_checkpoints(config, out_dir: str, options: Optional[MergeOptions] = None, **kwargs) -> MergeResult:
    """Merge the checkpoints of a mergekit-style config into ``out_dir``.

    Args:
        config: a path to a YAML file, a YAML string, a mapping, or a :class:`MergeConfig`.
        out_dir: the output folder. It must not exist unless ``overwrite=True``; it appears only when
            the merge is complete (the work happens in a hidden temporary folder beside it).
        options: a :class:`MergeOptions`, or its fields as keyword arguments.

    Returns:
        A :class:`MergeResult` (tensors, bytes, seconds, shard names).

    Raises:
        ConfigError / PlanError / CheckpointError (ValueError): before any weight is read.
        MergeError: while merging (a NaN/Inf input, a full disk, an interrupt); nothing is left behind.

    Example:
        >>> import fastmerge  # doctest: +SKIP
        >>> fastmerge.merge_checkpoints("ties.yml", "out/merged", random_seed=0)  # doctest: +SKIP
    """
    opts = options or MergeOptions(**kwargs)
    if options is not None and kwargs:
        opts = MergeOptions(**{**opts.__dict__, **kwargs})
    if isinstance(opts.out_shard_size, str):
        opts.out_shard_size = parse_size(opts.out_shard_size)
    cfg = load_config(config)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not opts.overwrite:
        raise CheckpointError(f"the output folder {out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    _return_large_buffers_to_the_os()
    plan = build_plan(cfg, allow_crimes=opts.allow_crimes)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.incomplete-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writer = prog = None
    show = (not opts.quiet) and (opts.progress if opts.progress is not None else sys.stderr.isatty())
    notes = list(plan.warnings)
    if not opts.quiet:
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if device.type == "cuda":
        notes.append("--device cuda runs the methods' PyTorch formulations on the GPU (no fused GPU kernels yet)")
    fast = not opts.reference
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-prefetch") if opts.prefetch > 0 else None
    start = time.perf_counter()
    ok = False
    try:
        writer = ShardWriter(tmp, plan.out_tensors(), opts.out_shard_size,
                             {"merge_method": plan.method.name, "producer": "fastmerge"})
        prog = _Progress(plan.in_bytes, len(plan.items), show)
        items = plan.items
        pending: Dict[int, object] = {}

        def prefetch(k: int) -> None:
            if pool is None or k >= len(items) or k in pending:
                return
            it = items[k]
            refs = ([it.base] if it.base else []) + it.inputs
            # the budget is shared by the tensors in flight: a large one is faulted in only partly
            budget = PREFETCH_BYTES // (max(1, opts.prefetch) * max(1, len(refs)))
            pending[k] = pool.submit(lambda: [plan.checkpoints[m].prefetch(n, budget) for m, n in refs])

        thresholds = global_thresholds(plan, fast)
        for k in range(min(opts.prefetch, len(items))):
            prefetch(k)
        result_dtype = None
        for k, it in enumerate(items):
            fut = pending.pop(k, None)
            if fut is not None:
                fut.result()
            prefetch(k + opts.prefetch)
            sink = (lambda piece, last, name=it.out_name: writer.add_part(name, piece, last)) if not it.copy else None
            out = _merge_one(plan, it, opts.random_seed, device, fast, thresholds, sink)
            if it.out_dtype.is_floating_point and result_dtype is None:
                result_dtype = it.out_dtype
            if out is not None:
                writer.add(it.out_name, out)
            del out
            for m, n in ([it.base] if it.base else []) + it.inputs:
                plan.checkpoints[m].release(n)
            prog.update(it.in_bytes)
        shards = writer.finish()
        _output_files(plan, tmp, opts, result_dtype or torch.float32)
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(old, out_dir)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        ok = True
    except KeyboardInterrupt:
        raise MergeInterrupted(f"interrupted: the merge stopped cleanly and nothing was written to {out_dir}") from None
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergeError(f"no space left on the device of {parent} while writing the merged model; free at least "
                             f"{_fmt_bytes(plan.out_bytes)} there or choose another output folder") from None
        raise MergeError(f"writing {out_dir} failed: {e}") from None
    finally:
        if prog is not None:
            prog.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.abort()
        plan.close()
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    res = MergeResult(out_dir, len(plan.items), plan.in_bytes, plan.out_bytes, time.perf_counter() - start, shards,
                      plan.method.name, notes)
    return res


def dry_run(config, options: Optional[MergeOptions] = None, **kwargs) -> str:
    """The plan of a merge as text (nothing is read but headers, nothing is written)."""
    opts = options or MergeOptions(**kwargs)
    if isinstance(opts.out_shard_size, str):
        opts.out_shard_size = parse_size(opts.out_shard_size)
    plan = build_plan(load_config(config), allow_crimes=opts.allow_crimes)
    try:
        return describe(plan, opts)
    finally:
        plan.close()


__all__ = ["merge_checkpoints", "dry_run", "MergeOptions", "MergeResult", "MergeError", "MergeInterrupted",
           "MergeConfig"]
