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
from typing import Dict, List, Optional, Tuple

import torch

from . import methods as M
from . import reference as R
from .config import ConfigError, MergeConfig, load_config
from .dist import Failure, Group, MergeError, MergeInterrupted, RankFailed, first_failure, partition
from .io import CheckpointError, ShardLayout, ShardWriter, checksum_kind, copy_files, parse_size
from .plan import Item, Plan, build_plan
from .rng import stream_key
from .select import pick

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model", "chat_template.jinja",
                   "generation_config.json")
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.float64: "float64"}


PREFETCH_BYTES = 64 << 20  # input bytes faulted in ahead, shared by the prefetched tensors


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
    resume: bool = False  # finish the partial output of an earlier attempt (its verified tensors are skipped)
    timeout: float = 1800.0  # seconds a rank waits for the others at a sync point (under torchrun)
    distributed: Optional[bool] = None  # None: several processes when torchrun started this one
    max_memory: int = 2 * 1000 ** 3  # peak resident memory the merge aims at, mapped input pages counted
    readers: int = 4  # threads that read the inputs from disk ahead of the kernels (0: none)


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
    rank: int = 0
    world: int = 1
    ranks: List[dict] = field(default_factory=list)  # per rank: tensors, bytes, seconds, peak_rss, ...
    resumed: int = 0  # tensors verified from an earlier attempt and skipped
    storage_read: Optional[int] = None  # bytes this process read from storage (/proc/self/io), where counted

    @property
    def gbps(self) -> float:
        return self.in_bytes / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        read = sum(r["in_bytes"] for r in self.ranks) if self.ranks else self.in_bytes
        text = (f"merged {self.tensors} tensors with {self.method}: {read / 1e9:.2f} GB read, "
                f"{self.out_bytes / 1e9:.2f} GB written in {self.seconds:.2f} s "
                f"({read / max(self.seconds, 1e-9) / 1e9:.2f} GB/s)")
        stored = [r.get("storage_read") for r in self.ranks] if self.ranks else [self.storage_read]
        if stored and all(x is not None for x in stored):
            text += f"; {sum(stored) / 1e9:.2f} GB read from storage (the rest came from the page cache)"
        if self.world > 1:
            text += f" on {self.world} ranks"
        if self.resumed:
            text += f", {self.resumed} tensors kept from an earlier attempt"
        text += f" -> {self.out_dir}"
        if self.world > 1:
            text += "".join(f"\n  rank {r['rank']} ({r['host']}): {r['tensors']} tensors, {r['in_bytes'] / 1e9:.2f} GB "
                            f"read in {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB"
                            + (f", {r['bytes_all_reduced']} bytes all-reduced" if r["bytes_all_reduced"] else "")
                            for r in self.ranks)
        return text


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

    buffers = (PREFETCH_BYTES if opts.prefetch else 0) + ShardWriter.PIECE * ShardWriter.QUEUE
    window = _window(opts, plan)
    held = [it for it in plan.items if it.in_bytes <= window]
    # a tensor that fits the budget stays mapped whole through its passes; the others, a chunk at a time
    peak = max(plan.peak_bytes(buffers - ShardWriter.PIECE * ShardWriter.QUEUE, ShardWriter.PIECE * ShardWriter.QUEUE,
                               CHUNK), max((it.in_bytes for it in held), default=0) + buffers)
    lines.append(f"memory needed: about {_fmt_bytes(peak)} for tensors (the inputs of the largest tensor that stays "
                 f"mapped or of the largest chunk in flight, temporaries, prefetched inputs and output waiting for the "
                 f"disk), plus the Python and PyTorch runtime (about 0.6 GB with a CUDA build of torch)")
    big = max(plan.items, key=lambda i: i.in_bytes)
    lines.append(f"largest tensor: {big.out_name} {list(big.shape)} ({_fmt_bytes(big.in_bytes)} of inputs)")
    lines.append(f"memory budget (--max-memory): {_fmt_bytes(int(opts.max_memory))}: the inputs of {len(held)} of "
                 f"{len(plan.items)} tensors (up to {_fmt_bytes(window)} each) stay mapped through their passes; "
                 f"larger ones are read chunk by chunk, their later passes from the page cache")
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
            left = max(0, self.bar.total - self.done)
            self.bar.set_postfix_str(f"{self.count}/{self.n} tensors, {_fmt_bytes(left)} to read", refresh=False)
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


def global_thresholds(plan: Plan, fast: bool, group: Optional[Group] = None,
                      share: Optional[List[int]] = None, readers: int = 0) -> Optional[List[int]]:
    """``ties`` with ``scope: global``: each model's exact magnitude threshold over all of its tensors.

    Two streaming passes over the inputs, each summing per-model histograms of the float32 bits of
    |delta| (the top 16 bits, then the low 16 bits inside the bin that holds the rank), so the memory is
    O(models x 65536) whatever the model size. Under ``torchrun`` each rank counts the tensors of its
    ``share`` (indices into the plan's items) and the ranks all-reduce the histograms: 2 x models x 65536
    int64 numbers in all, whatever the model size, and the thresholds equal one process's exactly. With
    ``fast=False`` the reference concatenates every |delta| and takes a kthvalue (verification only)."""
    group = group or Group(distributed=False)
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
    if not fast:  # every rank computes the whole reference (verification only)
        deltas = [[] for _ in models]
        for it in items:
            job = _job(plan, it, None, torch.device("cpu"), False)
            for t, x in enumerate(job.inputs):
                deltas[t].append(R.work(x).reshape(-1) - R.work(job.base).reshape(-1))
        return [R.global_threshold(ds, d) if d < 1 else 0 for ds, d in zip(deltas, dens)]
    from .._ops import _C

    T = len(models)
    mine = [plan.items[i] for i in share if not plan.items[i].copy] if share is not None else items

    def hist(prefix, stage):
        h = torch.zeros(T, 1 << 16, dtype=torch.int64)
        failure = own = None
        reader = _Reader(plan, mine, MergeOptions(readers=readers), torch.device("cpu"))
        try:
            for k, it in enumerate(mine):
                reader.at(k)
                job = _job(plan, it, None, torch.device("cpu"), True)
                flat = M._common([job.base] + job.inputs)
                for a, b in M._chunks(flat[0].numel()):  # a large tensor's pages leave chunk by chunk
                    h += _C.ckpt_key_hist(flat[0][a:b], [x[a:b] for x in flat[1:]], prefix)[0]
                    for m, name in [it.base] + it.inputs:
                        plan.checkpoints[m].release(name, a, b)
                del job, flat
        except KeyboardInterrupt as e:
            failure = Failure(group.rank, _why(e, group), resumable=True)
            own = MergeInterrupted(f"{failure.message} during the global-TIES histogram passes: nothing was merged "
                                   f"yet and the output folder was not created")
        except Exception as e:
            if group.world == 1:
                raise
            failure = Failure(group.rank, f"{stage}: {e}", resumable=False)
            own = e
        finally:
            reader.close()
        if failure is not None:
            group.post_failure(failure)
        _raise_if_failed(group, group.exchange(stage, failure), failure, own)
        return group.all_reduce_sum(h, stage)

    h1 = hist([-1] * T, "global TIES, first histogram pass")
    coarse = [pick(h1[t], ranks[t]) for t in range(T)]
    h2 = hist([c[0] for c in coarse], "global TIES, second histogram pass")
    keys = []
    for t in range(T):
        d = pick(h2[t], ranks[t] - coarse[t][1])[0]
        keys.append(0 if dens[t] >= 1 else (coarse[t][0] << 16) | d)
    return keys


def _raise_if_failed(group: Group, got, own: Optional[Failure], own_exc: Optional[BaseException] = None,
                     suffix: str = "") -> None:
    """After a sync point: raise on every rank when any rank failed (the failing rank raises its own error)."""
    f = first_failure([g[0] for g in got])
    if f is None:
        return
    if own is not None and own_exc is not None and (f.rank == group.rank or own.primary):
        raise _with_suffix(own_exc, suffix)
    if own is not None and own_exc is None and f.rank == group.rank:
        raise MergeError(own.message + suffix)
    raise RankFailed(f.text() + suffix)


def _with_suffix(exc: BaseException, suffix: str) -> BaseException:
    if not suffix:
        return exc
    try:
        new = type(exc)(str(exc) + suffix)
    except Exception:
        return exc
    return new


READ_AHEAD = 4 << 30  # at most this many input bytes read ahead of the end of the tensor being merged


def _read_ahead_bytes() -> int:
    """How far the readers may get ahead: a quarter of the memory the system has available (so what they
    read stays in the page cache until it is used), from 256 MiB to ``READ_AHEAD``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(256 << 20, min(READ_AHEAD, int(line.split()[1]) * 1024 // 4))
    except (OSError, ValueError, IndexError):
        pass
    return 256 << 20


def _read_order(plan: Plan, items: List[Item]) -> Tuple[List[Tuple[str, int, int]], List[int]]:
    """The input bytes of ``items`` in the order the merge uses them: each tensor chunk by chunk, its
    models side by side. Returns the (file, offset, length) segments and where each item's bytes end."""
    from .methods import _chunks

    segs: List[Tuple[str, int, int]] = []
    ends: List[int] = []
    pos = 0
    for it in items:
        infos = [plan.checkpoints[m].tensors[n] for m, n in ([it.base] if it.base else []) + it.inputs]
        for a, b in _chunks(max(1, math.prod(it.shape))):
            for info in infos:
                size = info.dtype.itemsize
                lo, hi = min(info.nbytes, a * size), min(info.nbytes, b * size)
                if hi > lo:
                    segs.append((info.file, info.start + lo, hi - lo))
                    pos += hi - lo
        ends.append(pos)
    return segs, ends


class _Reader:
    """The read-ahead threads over this process's items (:class:`fastmerge.merge.readahead.ReadAhead`),
    kept at most :func:`_read_ahead_bytes` past the end of the tensor being merged."""

    def __init__(self, plan: Plan, items: List[Item], opts: MergeOptions, device: torch.device):
        self.ra = None
        self.ends: List[int] = []
        self.ahead = _read_ahead_bytes()
        if opts.readers > 0 and device.type == "cpu" and items:
            from .readahead import ReadAhead

            segs, self.ends = _read_order(plan, items)
            self.ra = ReadAhead(segs, threads=opts.readers, limit=self.ends[0] + self.ahead)

    def at(self, k: int) -> None:
        """The merge starts item ``k`` (and is done with the items before it)."""
        if self.ra is not None and k < len(self.ends):
            self.ra.allow(self.ends[k] + self.ahead)
            if k > 0:
                self.ra.drop(self.ends[k - 1])

    def close(self) -> None:
        if self.ra is not None:
            self.ra.close(drop=True)
            self.ra = None


def _window(opts: MergeOptions, plan: Plan) -> int:
    """Input bytes a tensor may have and still stay mapped through all its passes: the memory budget less
    what the process holds already, the writer's buffers and queue, the prefetched pages and a margin
    for the selection's records. Larger tensors are read chunk by chunk in every pass (the pages of
    passes after the first come from the page cache)."""
    from .io import ShardWriter

    held = _current_rss() + ShardWriter.PIECE * ShardWriter.QUEUE + ShardWriter.LEND * (ShardWriter.QUEUE + 2) + \
        (PREFETCH_BYTES if opts.prefetch else 0) + (128 << 20)
    return max(0, int(opts.max_memory) - held)


def _merge_one(plan: Plan, item: Item, seed: Optional[int], device: torch.device, fast: bool,
               thresholds: Optional[List[int]] = None, sink=None, buffer=None,
               window: Optional[int] = None) -> Optional[torch.Tensor]:
    """The merged tensor, or None when the fused path handed it to ``sink`` in pieces (taken from
    ``buffer`` where given). ``window``: the input bytes a tensor may keep mapped through its passes."""
    job = _job(plan, item, seed, device, fast)
    job.thresholds = thresholds
    job.resident = window is not None and item.in_bytes <= window
    job.sink = sink
    job.buffer = buffer
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


META = ".fastmerge"  # the bookkeeping folder inside a partial output (removed before the rename)


def partial_dir(out_dir: str) -> str:
    """The hidden folder beside ``out_dir`` where a merge is written until it is complete."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def _fingerprint(plan: Plan, opts: MergeOptions, device: torch.device) -> str:
    """What the output bytes depend on: the config, the options that change them, fastmerge's version and
    every input tensor's file, dtype, shape and byte range (an attempt is resumed only when they match)."""
    import hashlib

    from .. import __version__

    h = hashlib.sha256(plan.config.to_yaml().encode())
    h.update(json.dumps({"seed": opts.random_seed or 0, "shard_size": opts.out_shard_size, "reference": opts.reference,
                         "device": device.type, "version": __version__}, sort_keys=True).encode())
    for m in sorted(plan.checkpoints):
        for name, t in sorted(plan.checkpoints[m].tensors.items()):
            h.update(f"{m}|{name}|{os.path.basename(t.file)}|{t.dtype}|{t.shape}|{t.start}|{t.nbytes}\n".encode())
    return h.hexdigest()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _lock(partial: str) -> int:
    """Hold the partial folder's lock for the life of the merge (rank 0 only)."""
    import fcntl

    fd = os.open(os.path.join(partial, META, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MergeError(f"another fastmerge merge is writing {partial} (it holds the lock); wait for it to end or "
                         f"stop it") from None
    return fd


class _Log:
    """This rank's record of the tensors it finished (name, place and checksum), one JSON line each, appended
    by the writer thread once a tensor's last byte is written: what ``--resume`` checks and skips."""

    def __init__(self, partial: str, rank: int, layout: ShardLayout, kind: str):
        self.layout = layout
        self.kind = kind
        path = os.path.join(partial, META, f"written-rank{rank}.jsonl")
        self.f = open(path, "a")
        if self.f.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self.f.write("\n")  # a line cut short by a kill stays on its own line

    def record(self, name: str, crc: int) -> None:
        si, off, n = self.layout.where[name]
        self.f.write(json.dumps({"tensor": name, "shard": self.layout.names[si], "offset": off, "nbytes": n,
                                 "checksum": crc, "kind": self.kind}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _logged(partial: str) -> Dict[str, dict]:
    """Every tensor recorded as written by any rank of any earlier attempt."""
    done: Dict[str, dict] = {}
    meta = os.path.join(partial, META)
    for fn in sorted(os.listdir(meta)) if os.path.isdir(meta) else []:
        if fn.startswith("written-") and fn.endswith(".jsonl"):
            with open(os.path.join(meta, fn)) as f:
                for line in f:
                    try:
                        e = json.loads(line)
                        done[e["tensor"]] = e
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
    return done


def _prepare(partial: str, opts: MergeOptions, fp: str, layout: ShardLayout, world: int):
    """Rank 0: make (or, with --resume, reopen) the partial folder and its shard files.

    Returns (lock fd, info for the other ranks, notes). A failure here (a full disk while the shards are
    reserved, say) leaves nothing behind unless an earlier attempt is being resumed."""
    meta = os.path.join(partial, META)
    notes = []
    resumed = False
    lock = None
    if os.path.isdir(partial):
        if os.path.isdir(meta):
            lock = _lock(partial)  # a merge that is still writing the folder stops this one here
        try:
            old = _read_json(os.path.join(meta, "run.json"))
            if opts.resume and old is not None and old.get("fingerprint") == fp:
                resumed = True
            elif opts.resume and old is not None:
                raise MergeError(f"--resume: the partial output in {partial} was made from another config, other "
                                 f"inputs, seed, shard size, device or fastmerge version; start over with --overwrite")
            elif opts.overwrite or (opts.resume and old is None):
                shutil.rmtree(partial)
                notes.append(f"removed the partial output of an earlier attempt in {partial}")
            else:
                raise MergeError(f"an earlier attempt left a partial output in {partial}: pass --resume to finish it, "
                                 f"or --overwrite to start over")
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        if not resumed and lock is not None:
            os.close(lock)  # its file went with the folder
            lock = None
    elif opts.resume:
        notes.append("--resume: no partial output was found, so the merge starts from the beginning")
    ours = resumed  # whether the folder may be removed on failure: only once this merge holds its lock
    try:
        os.makedirs(meta, exist_ok=True)
        if lock is None:
            lock = _lock(partial)
        ours = True
        import uuid

        token = uuid.uuid4().hex
        _write_json(os.path.join(meta, "run.json"), {"fingerprint": fp, "token": token, "ranks": world,
                                                     "started": time.time()})
        kept = layout.create(partial, keep=resumed)
        thresholds = (_read_json(os.path.join(meta, "thresholds.json")) or {}).get("keys") if resumed else None
    except BaseException:
        if lock is not None:
            os.close(lock)
        if ours and not resumed:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if resumed:
        notes.append(f"--resume: continuing the partial output in {partial} ({kept} of {len(layout.names)} shard "
                     f"files kept)")
    return lock, {"token": token, "resumed": resumed, "thresholds": thresholds}, notes


def _as_failure(e: BaseException, rank: int, out_dir: str, parent: str, plan: Plan) -> Tuple[Failure, BaseException]:
    """A failure while merging -> (what the other ranks learn, what this rank raises)."""
    import errno

    if isinstance(e, RankFailed):
        return Failure(rank, str(e), resumable=True, primary=False), e
    if isinstance(e, MergeInterrupted):
        return Failure(rank, str(e), resumable=True), e
    if isinstance(e, (MergeError, ValueError)):
        return Failure(rank, str(e), resumable=False), e
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            exc = MergeError(f"no space left on the device of {parent} while writing the merged model; free at least "
                             f"{_fmt_bytes(plan.out_bytes)} there or choose another output folder")
            return Failure(rank, str(exc), resumable=False), exc
        exc = MergeError(f"writing {out_dir} failed: {e}")
        return Failure(rank, str(exc), resumable=True), exc
    return Failure(rank, f"{type(e).__name__}: {e}", resumable=False), e


def storage_read_bytes() -> Optional[int]:
    """Bytes this process has caused to be read from storage (``read_bytes`` of /proc/self/io: page faults,
    read-ahead and reads that the page cache did not serve), or None where the kernel does not count them."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def merge_checkpoints(config, out_dir: str, options: Optional[MergeOptions] = None, **kwargs) -> MergeResult:
    """Merge the checkpoints of a mergekit-style config into ``out_dir``.

    Under ``torchrun`` (or with a ``torch.distributed`` process group already initialised) every rank
    calls this with the same arguments: the output tensors are split among the ranks, balanced by the
    bytes they read, each rank writes its tensors into the shared output files, and rank 0 publishes
    the folder once every rank has finished. The files are the same, bit for bit, for any number of
    ranks. ``out_dir`` must then be on storage that every rank can see.

    Args:
        config: a path to a YAML file, a YAML string, a mapping, or a :class:`MergeConfig`.
        out_dir: the output folder. It must not exist unless ``overwrite=True``; it appears only when
            the merge is complete (the work happens in the hidden folder ``.NAME.partial`` beside it).
        options: a :class:`MergeOptions`, or its fields as keyword arguments.

    Returns:
        A :class:`MergeResult` (tensors, bytes, seconds, shard names; under torchrun, every rank's figures).

    Raises:
        ConfigError / PlanError / CheckpointError (ValueError): before any weight is read.
        MergeError: while merging (a NaN/Inf input, a full disk, an interrupt, another rank's failure, a
            timeout); the output folder is not created. After an interrupt or a lost rank the finished
            tensors are kept in the partial folder for ``resume=True``; after a bad input or a full disk
            the partial folder is removed.

    Example:
        >>> import fastmerge  # doctest: +SKIP
        >>> fastmerge.merge_checkpoints("ties.yml", "out/merged", random_seed=0)  # doctest: +SKIP
    """
    opts = options or MergeOptions(**kwargs)
    if options is not None and kwargs:
        opts = MergeOptions(**{**opts.__dict__, **kwargs})
    if isinstance(opts.out_shard_size, str):
        opts.out_shard_size = parse_size(opts.out_shard_size)
    if isinstance(opts.max_memory, str):
        opts.max_memory = parse_size(opts.max_memory)
    if opts.readers < 0:
        raise ValueError(f"readers must be >= 0, got {opts.readers}")
    group = Group(opts.timeout, opts.device, opts.distributed)
    try:
        try:
            return _merge(group, config, os.path.abspath(out_dir), opts)
        finally:
            group.close()
    except KeyboardInterrupt as e:  # one that arrived outside the merge loop (a SIGTERM in a collective, say)
        raise MergeInterrupted(f"{_why(e, group)}: the merge stopped and {out_dir} was not created; finished "
                               f"tensors, if any, are kept in {partial_dir(out_dir)}: rerun with --resume") from None


def _merge(group: Group, config, out_dir: str, opts: MergeOptions) -> MergeResult:
    start = time.perf_counter()
    rank, world = group.rank, group.world
    # ---- planning: every rank reads the headers and checks everything before any weight is read
    plan = None
    failure = exc = None
    try:
        cfg = load_config(config)
        if os.path.exists(out_dir) and not opts.overwrite:
            raise CheckpointError(f"the output folder {out_dir} exists; pass --overwrite (overwrite=True) to replace it")
        device = group.device or torch.device(opts.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        plan = build_plan(cfg, allow_crimes=opts.allow_crimes)
        ts = cfg.tokenizer_source
        if opts.copy_tokenizer and ts not in (None, "base") and ts not in plan.folders:
            from .io import resolve_model

            resolve_model(ts, cfg.base_dir)  # a missing tokenizer source fails now, not after the merge
    except Exception as e:
        if world == 1:
            raise
        failure, exc = Failure(rank, str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}",
                               resumable=False), e
    try:
        _raise_if_failed(group, group.exchange("planning", failure), failure, exc)
        return _merge_planned(group, plan, out_dir, opts, device, start)
    finally:
        if plan is not None:
            plan.close()


def _merge_planned(group: Group, plan: Plan, out_dir: str, opts: MergeOptions, device: torch.device,
                   start: float) -> MergeResult:
    rank, world = group.rank, group.world
    read0 = storage_read_bytes()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    _return_large_buffers_to_the_os()
    parent = os.path.dirname(out_dir)
    partial = partial_dir(out_dir)
    notes = list(plan.warnings)
    if not opts.quiet and rank == 0:
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if device.type == "cuda":
        notes.append("--device cuda runs the methods' PyTorch formulations on the GPU (no fused GPU kernels yet)")
    fast = not opts.reference
    items = plan.items
    layout = ShardLayout(plan.out_tensors(), opts.out_shard_size,
                         {"merge_method": plan.method.name, "producer": "fastmerge"})
    fp = _fingerprint(plan, opts, device)

    # ---- rank 0 prepares the partial folder; the others check that they see it
    lock = None
    failure = exc = None
    info = None
    try:
        if rank == 0:
            os.makedirs(parent, exist_ok=True)
            lock, info, more = _prepare(partial, opts, fp, layout, world)
            notes += more
            if not opts.quiet:
                for n in more:
                    print(f"note: {n}", file=sys.stderr)
    except Exception as e:
        failure, exc = _as_failure(e, rank, out_dir, parent, plan)
    try:
        got = group.exchange("preparing the output folder", failure, info)
        _raise_if_failed(group, got, failure, exc)
        info = got[0][1]
        try:
            done, mine, thresholds = _before_merging(group, plan, layout, partial, opts, info, fast)
        except BaseException:
            if rank == 0 and not info["resumed"]:  # nothing was merged: leave nothing behind
                _discard(partial, lock)
                lock = None
            raise
        result = _merge_share(group, plan, [items[i] for i in mine], layout, partial, out_dir, opts, device,
                              thresholds, fast)
        stats = {"rank": rank, "host": group.host, "tensors": len(mine), "resumed": len(done),
                 "in_bytes": sum(items[i].in_bytes for i in mine),
                 "out_bytes": sum(layout.where[items[i].out_name][2] for i in mine),
                 "seconds": time.perf_counter() - start, "peak_rss": _peak_rss(),
                 "storage_read": None if read0 is None else storage_read_bytes() - read0,
                 "bytes_all_reduced": group.bytes_reduced}
        failure, exc = result
        try:
            got = group.exchange("finishing", failure, stats)
        except MergeError as e:  # another rank was lost: what is written stays valid for --resume
            raise _with_suffix(exc if isinstance(exc, MergeInterrupted) else e, _kept(partial)) from None
        f = first_failure([g[0] for g in got])
        if f is not None:
            # a bad input or a full disk discards the partial folder; an interrupt or a lost rank keeps it
            keep = all(g[0].resumable for g in got if g[0] is not None and g[0].primary)
            if rank == 0 and not keep:
                _discard(partial, lock)
                lock = None
            _raise_if_failed(group, got, failure, exc, _kept(partial) if keep else "")
        ranks = [g[1] for g in got]

        # ---- rank 0 publishes the folder
        failure = exc = None
        published = False
        if rank == 0:
            try:
                result_dtype = next((it.out_dtype for it in items if it.out_dtype.is_floating_point), torch.float32)
                layout.write_index(partial)
                _output_files(plan, partial, opts, result_dtype)
                _publish(partial, out_dir)
                published = True
                shutil.rmtree(os.path.join(out_dir, META), ignore_errors=True)  # the bookkeeping, once in place
            except Exception as e:
                failure, exc = _as_failure(e, rank, out_dir, parent, plan)
        try:
            got = group.exchange("publishing the output folder", failure)
        except MergeError:
            if not published:
                raise
            got = [(None, None)]  # the folder is complete; a rank lost after it reported success changes nothing
            notes.append("a rank was lost after the output folder was published")
        _raise_if_failed(group, got, failure, exc, _kept(partial) if rank == 0 and failure is not None else "")
    finally:
        if lock is not None:
            os.close(lock)
    return MergeResult(out_dir, len(items), plan.in_bytes, plan.out_bytes, time.perf_counter() - start,
                       list(layout.names), plan.method.name, notes, rank=rank, world=world, ranks=ranks,
                       resumed=len(done), storage_read=stats["storage_read"])


def _before_merging(group: Group, plan: Plan, layout: ShardLayout, partial: str, opts: MergeOptions, info: dict,
                    fast: bool):
    """After rank 0 prepared the partial folder: check that every rank sees it, verify the tensors of an
    earlier attempt (--resume), share out the rest, and find the global-TIES thresholds.

    Returns (indices already done, this rank's indices, thresholds or None)."""
    rank, world, items = group.rank, group.world, plan.items
    failure = exc = None
    if rank != 0:
        seen = _read_json(os.path.join(partial, META, "run.json")) or {}
        if seen.get("token") != info["token"]:
            failure = Failure(rank, f"rank {rank} on {group.host} cannot see {partial}, which rank 0 created: the "
                                    f"output folder must be on storage that every rank shares", resumable=False)
            exc = MergeError(failure.message)
    _raise_if_failed(group, group.exchange("checking the shared output folder", failure), failure, exc)

    # ---- with --resume: the ranks check the tensors of the earlier attempts, then share out the rest
    done: set = set()
    if info["resumed"]:
        logged = _logged(partial)
        share = partition([layout.where[it.out_name][2] for it in items], world)[rank]
        ok = []
        for i in share:
            e = logged.get(items[i].out_name)
            si, off, n = layout.where[items[i].out_name]
            try:
                if e and (e.get("shard"), e.get("offset"), e.get("nbytes")) == (layout.names[si], off, n) and \
                        layout.checksum(partial, items[i].out_name, e.get("kind")) == e.get("checksum"):
                    ok.append(i)
            except Exception:  # unreadable, or a checksum this build cannot compute: merged again
                pass
        for _, verified in group.exchange("checking the tensors of the earlier attempt", None, ok):
            done.update(verified)
        if rank == 0 and not opts.quiet:
            print(f"note: --resume: {len(done)} of {len(items)} tensors were written and verified in an earlier "
                  f"attempt and are skipped", file=sys.stderr)
    remaining = [i for i in range(len(items)) if i not in done]
    mine = [remaining[j] for j in partition([items[i].in_bytes for i in remaining], world)[rank]]

    thresholds = info["thresholds"]
    if thresholds is None:
        share = list(partition([it.in_bytes for it in items], world)[rank])
        thresholds = global_thresholds(plan, fast, group, share, opts.readers)
        if thresholds is not None and rank == 0:
            try:  # kept for --resume, which then skips the histogram passes
                _write_json(os.path.join(partial, META, "thresholds.json"), {"keys": thresholds})
            except OSError:
                pass
    return done, mine, thresholds


def _why(e: KeyboardInterrupt, group: Group) -> str:
    """How an interrupt is reported: Ctrl-C, or SIGTERM (how torchrun stops the ranks when one fails)."""
    if str(e) != "SIGTERM":
        return "interrupted"
    if group.world > 1:
        return (f"terminated by SIGTERM{group.gone_text()} (torchrun stops every rank this way when one fails: see "
                f"its report)")
    return "terminated by SIGTERM"


def _kept(partial: str) -> str:
    return f"; the finished tensors are kept in {partial}: rerun with --resume to finish the merge"


def _discard(partial: str, lock: Optional[int]) -> None:
    if lock is not None:
        os.close(lock)
    shutil.rmtree(partial, ignore_errors=True)


def _publish(partial: str, out_dir: str) -> None:
    """Rename the complete folder into place (replacing an old output only once the new one is whole)."""
    if os.path.exists(out_dir):
        old = f"{partial}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        try:
            os.rename(partial, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out_dir)


def _merge_share(group: Group, plan: Plan, mine: List[Item], layout: ShardLayout, partial: str, out_dir: str,
                 opts: MergeOptions, device: torch.device, thresholds, fast: bool):
    """Merge this rank's tensors into the shard files. Returns (failure, exception) or (None, None).

    A failure or an interrupt stops the loop: the other ranks learn it through the store (and stop at
    their next tensor), the finished tensors stay recorded for ``--resume``, and the caller reports it
    at the next sync point."""
    rank = group.rank
    show = rank == 0 and (not opts.quiet) and (opts.progress if opts.progress is not None else sys.stderr.isatty())
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-prefetch") if opts.prefetch > 0 else None
    log = writer = prog = reader = None
    pending: Dict[int, object] = {}
    try:
        window = _window(opts, plan)
        # tensors over the budget first: their later passes (from the page cache) then overlap the reads
        # of the tensors after them, instead of leaving the disk idle at the end (each tensor is written at
        # its planned offset, so the order changes no byte)
        mine = [it for it in mine if it.in_bytes > window] + [it for it in mine if it.in_bytes <= window]
        log = _Log(partial, rank, layout, checksum_kind())
        writer = ShardWriter(partial, layout, [it.out_name for it in mine], on_done=log.record)
        prog = _Progress(sum(it.in_bytes for it in mine), len(mine), show)
        reader = _Reader(plan, mine, opts, device)

        def prefetch(k: int) -> None:
            if pool is None or k >= len(mine) or k in pending:
                return
            it = mine[k]
            refs = ([it.base] if it.base else []) + it.inputs
            # the budget is shared by the tensors in flight: a large one is faulted in only partly
            budget = PREFETCH_BYTES // (max(1, opts.prefetch) * max(1, len(refs)))
            pending[k] = pool.submit(lambda: [plan.checkpoints[m].prefetch(n, budget) for m, n in refs])

        for k in range(min(opts.prefetch, len(mine))):
            prefetch(k)
        polled = time.perf_counter()
        for k, it in enumerate(mine):
            if group.world > 1 and time.perf_counter() - polled > 0.2:
                polled = time.perf_counter()
                posted = group.posted_failure()
                if posted is not None and posted.rank != rank:
                    raise RankFailed(posted.text())
            reader.at(k)
            fut = pending.pop(k, None)
            if fut is not None:
                fut.result()
            prefetch(k + opts.prefetch)
            sink = (lambda piece, last, name=it.out_name: writer.add_part(name, piece, last)) if not it.copy else None
            out = _merge_one(plan, it, opts.random_seed, device, fast, thresholds, sink, writer.buffer, window)
            if out is not None:
                writer.add(it.out_name, out)
            del out
            for m, n in ([it.base] if it.base else []) + it.inputs:
                plan.checkpoints[m].release(n)
            prog.update(it.in_bytes)
        writer.finish()
        return None, None
    except KeyboardInterrupt as e:
        failure = Failure(rank, _why(e, group), resumable=True)
        group.post_failure(failure)
        if writer is not None:
            writer.drain()  # what is finished counts for --resume
            writer = None
        return failure, MergeInterrupted(f"{failure.message}: the merge stopped cleanly and {out_dir} was not created")
    except Exception as e:
        failure, exc = _as_failure(e, rank, out_dir, os.path.dirname(out_dir), plan)
        group.post_failure(failure)
        return failure, exc
    finally:
        if reader is not None:
            reader.close()
        if prog is not None:
            prog.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            writer.abort()
        if log is not None:
            log.close()


def dry_run(config, options: Optional[MergeOptions] = None, **kwargs) -> str:
    """The plan of a merge as text (nothing is read but headers, nothing is written)."""
    opts = options or MergeOptions(**kwargs)
    if isinstance(opts.out_shard_size, str):
        opts.out_shard_size = parse_size(opts.out_shard_size)
    if isinstance(opts.max_memory, str):
        opts.max_memory = parse_size(opts.max_memory)
    plan = build_plan(load_config(config), allow_crimes=opts.allow_crimes)
    try:
        return describe(plan, opts)
    finally:
        plan.close()


__all__ = ["merge_checkpoints", "dry_run", "MergeOptions", "MergeResult", "MergeError", "MergeInterrupted",
           "MergeConfig"]
