"""Safetensors checkpoints on disk: headers, memory-mapped reads, sharded streaming writes.

Reading never loads a file: :class:`Checkpoint` parses the headers of a model folder (one
``model.safetensors`` or the shards named by ``model.safetensors.index.json``) and validates them
against the file sizes, so a truncated or foreign file fails before any weight is read. Tensors are
then views of read-only memory maps; :meth:`Checkpoint.release` drops the pages of a tensor from the
process once it has been merged (the page cache keeps them), so the resident memory stays a few
tensors whatever the model size.

Writing is planned: :class:`ShardLayout` knows every output tensor's name, shape, dtype, shard and
byte offset before the first byte is written, and creates each shard file at its full size with its
header; :class:`ShardWriter` then writes tensors at their offsets as they are computed, so that any
number of processes can each write their share of the same files.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# safetensors dtype names, their torch dtypes and item sizes
DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A model folder or file that cannot be merged; the message is one line naming the model,
    the file or tensor, and the fix."""


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the file."""

    name: str
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str, model: str = "") -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header (no tensor data is read).

    Returns the tensors by name and the file's ``__metadata__``. Raises :class:`CheckpointError` for
    a file that is not safetensors, is truncated, or whose header contradicts itself.
    """
    who = f"model {model}: " if model else ""
    fix = "re-download or re-save the checkpoint (safetensors format)"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{who}{path} is not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{who}{path} is not a safetensors file or is truncated (header of {n} bytes in a "
                                      f"{size}-byte file); {fix}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{who}cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{who}{path} is not a safetensors file (its header is not JSON); {fix}") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    out: Dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            b, e = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{who}{path}: tensor {name} has an unreadable or unsupported header entry {spec!r}; "
                                  f"{fix}") from None
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * itemsize(dtype) or b < 0:
            raise CheckpointError(f"{who}{path}: tensor {name} has {e - b} bytes for shape {list(shape)} "
                                  f"{spec['dtype']}; {fix}")
        if data_start + e > size:
            raise CheckpointError(f"{who}{path} is truncated: tensor {name} ends at byte {data_start + e} of a "
                                  f"{size}-byte file; {fix}")
        out[name] = TensorInfo(name, path, dtype, shape, data_start + b, e - b)
    return out, meta


class Checkpoint:
    """A model folder of safetensors, read lazily.

    Args:
        path: the folder (holding ``model.safetensors``, or shards and ``model.safetensors.index.json``,
            or any ``*.safetensors`` files).
        label: how errors name the model (the reference written in the config).
    """

    def __init__(self, path: str, label: Optional[str] = None):
        self.path = path
        self.label = label or path
        self.tensors: Dict[str, TensorInfo] = {}
        self._maps: Dict[str, mmap.mmap] = {}
        self._files: Dict[str, object] = {}
        self._lock = threading.Lock()
        files = self._files_of_folder()
        for f in files:
            infos, _ = read_header(f, self.label)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"model {self.label}: tensor {name} is stored twice ({self.tensors[name].file} "
                                          f"and {f}); remove the stale shard")
                self.tensors[name] = info

    def _files_of_folder(self) -> List[str]:
        p = self.path
        if not os.path.isdir(p):
            raise CheckpointError(f"model {self.label}: {p} is not a folder; give a model folder or a Hugging Face repo "
                                  f"name that is in the local cache")
        index = os.path.join(p, INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"model {self.label}: {index} is not a valid index ({e}); re-save the checkpoint") \
                    from None
            files = []
            for fn in dict.fromkeys(wm.values()):
                fp = os.path.join(p, fn)
                if not os.path.exists(fp):
                    raise CheckpointError(f"model {self.label}: shard {fn} named by {INDEX_NAME} is missing; "
                                          f"download the complete checkpoint")
                files.append(fp)
            self._index = wm
            return files
        self._index = None
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
        if not files:
            extra = " (.bin / .pt checkpoints are not supported: convert them to safetensors)" if any(
                f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(p)) else ""
            raise CheckpointError(f"model {self.label}: no .safetensors files in {p}{extra}")
        return files

    def check_index(self) -> None:
        """The index's weight map and the shards' headers name the same tensors in the same files."""
        if self._index is None:
            return
        for name, fn in self._index.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"model {self.label}: tensor {name} is listed in {INDEX_NAME} but missing from "
                                      f"{fn}; re-download the checkpoint")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _map(self, file: str) -> mmap.mmap:
        with self._lock:  # the prefetch thread and the merge may open a shard at the same time
            if file not in self._maps:
                f = open(file, "rb")
                size = os.fstat(f.fileno()).st_size
                self._files[file] = f
                self._maps[file] = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
            return self._maps[file]

    def get(self, name: str) -> torch.Tensor:
        """A read-only tensor view of the memory-mapped bytes (no copy)."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        m = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the buffer is read-only; nothing writes to it
            t = torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.start)
        return t.view(info.shape)

    def prefetch(self, name: str, max_bytes: Optional[int] = None) -> None:
        """Ask the kernel to read a tensor's pages ahead and fault in its first ``max_bytes`` (all by
        default) so the page faults happen here, not in the kernels (call from a helper thread)."""
        info = self.tensors[name]
        m = self._map(info.file)
        if m is None or info.nbytes == 0:
            return
        lo = info.start // PAGE * PAGE
        try:
            m.madvise(mmap.MADV_WILLNEED, lo, info.start + info.nbytes - lo)
        except (AttributeError, OSError, ValueError):
            pass
        span = info.start + info.nbytes - lo if max_bytes is None else min(info.start + info.nbytes - lo, max_bytes)
        if span > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pages = torch.frombuffer(m, dtype=torch.uint8, count=span, offset=lo)
            pages[::PAGE].sum()  # one byte per page

    def release(self, name: str, first: int = 0, last: Optional[int] = None) -> None:
        """Drop the pages of entries [first, last) of a tensor (all by default) from this process; they
        stay in the page cache. Pages shared with a neighbour are kept."""
        info = self.tensors[name]
        m = self._maps.get(info.file)
        if m is None or info.nbytes == 0:
            return
        size = itemsize(info.dtype)
        start = info.start + first * size
        end = info.start + (info.numel if last is None else last) * size
        lo = (start + PAGE - 1) // PAGE * PAGE
        hi = end // PAGE * PAGE
        if hi > lo:
            try:
                m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (AttributeError, OSError, ValueError):
                pass

    def close(self) -> None:
        for m in self._maps.values():
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a tensor view is still alive; the map closes with it
                    pass
        for f in self._files.values():
            f.close()
        self._maps.clear()
        self._files.clear()


# ------------------------------------------------------------------------------- writing

@dataclass
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: Sequence[OutTensor], shard_size: int) -> List[List[OutTensor]]:
    """Greedy assignment in plan order: a shard is closed when the next tensor would pass
    ``shard_size`` bytes (a tensor larger than the size gets a shard of its own)."""
    shards: List[List[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> List[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def checksum_kind() -> str:
    """The checksum that records written tensors: CRC-32C from the compiled extension (hardware
    instruction where the CPU has one), else zlib's CRC-32."""
    from .._ops import _C

    return "crc32c" if _C is not None and hasattr(_C, "ckpt_crc32c") else "crc32"


def checksum(data, crc: int = 0, kind: Optional[str] = None) -> int:
    """Chain ``crc`` over the bytes of ``data`` (a buffer); ``kind`` as :func:`checksum_kind`."""
    if (kind or checksum_kind()) == "crc32c":
        from .._ops import _C

        view = memoryview(data).cast("B")
        if not len(view):
            return crc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffers are only read
            return int(_C.ckpt_crc32c(torch.frombuffer(view, dtype=torch.uint8), crc))
    import zlib

    return zlib.crc32(data, crc)


def _write_at(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of an open file (a hook point: the full-disk test replaces it)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a new file, so that a full disk fails here, before any data is written.

    The fallocate system call reserves the blocks without writing them. Where the file system does not
    support it, the file is only extended (sparse) and the writes allocate as they go: glibc's
    posix_fallocate would instead write a zero into every block, which on a large output is a second
    full write."""
    import ctypes
    import errno

    if size == 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate64
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if fallocate(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err))
    except (OSError, AttributeError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
    os.ftruncate(fd, size)


class ShardLayout:
    """Where every output tensor goes: the shards (greedy in plan order, at most ``shard_size`` bytes
    each, as one process would write them), each shard's header, and each tensor's byte range.

    The layout depends only on the planned tensors and the shard size, so any number of processes
    writing their share of the tensors produce the same files."""

    def __init__(self, tensors: Sequence[OutTensor], shard_size: int, metadata: Optional[dict] = None):
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self.headers = [self._header(si) for si in range(len(self.shards))]
        self.where: Dict[str, Tuple[int, int, int]] = {}  # name -> (shard, absolute offset, bytes)
        self.sizes = []
        for si, shard in enumerate(self.shards):
            off = len(self.headers[si])
            for t in shard:
                self.where[t.name] = (si, off, t.nbytes)
                off += t.nbytes
            self.sizes.append(off)

    def _header(self, si: int) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for t in self.shards[si]:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the safetensors library writes it
        return struct.pack("<Q", len(raw)) + raw

    def _intact(self, path: str, si: int) -> bool:
        try:
            if os.path.getsize(path) != self.sizes[si]:
                return False
            with open(path, "rb") as f:
                return f.read(len(self.headers[si])) == self.headers[si]
        except OSError:
            return False

    def create(self, folder: str, keep: bool = False) -> int:
        """Create every shard file at its full size with its header (``keep``: leave the files of an
        earlier attempt that have the right size and header). Returns the number of files kept."""
        kept = 0
        for si, name in enumerate(self.names):
            path = os.path.join(folder, name)
            if keep and self._intact(path, si):
                kept += 1
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _allocate(fd, self.sizes[si])
                _write_at(fd, self.headers[si], 0)
            finally:
                os.close(fd)
        return kept

    def write_index(self, folder: str) -> None:
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": {t.name: self.names[si] for si, s in enumerate(self.shards) for t in s}}
            with open(os.path.join(folder, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")

    def checksum(self, folder: str, name: str, kind: Optional[str] = None) -> Optional[int]:
        """The checksum (:func:`checksum`) of a tensor's bytes as they are on disk (None when they cannot
        be read)."""
        si, off, n = self.where[name]
        crc = 0
        try:
            with open(os.path.join(folder, self.names[si]), "rb") as f:
                f.seek(off)
                while n:
                    b = f.read(min(n, ShardWriter.PIECE))
                    if not b:
                        return None
                    crc = checksum(b, crc, kind)
                    n -= len(b)
        except OSError:
            return None
        return crc


class ShardWriter:
    """Writes one process's share of the planned tensors into the shard files of a
    :class:`ShardLayout` (created beforehand), each tensor at its planned offset.

    ``add(name, tensor)`` (or ``add_part`` for a tensor produced in pieces) must be called in the order
    of ``names`` with the planned shapes and dtypes. A background thread writes the bytes (at most
    ``queue`` pieces of 8 MB wait), so writing overlaps the merge of the next tensors, and keeps a
    checksum (:func:`checksum`) of each tensor; ``on_done(name, crc)`` is called from that thread once a
    tensor's last byte is written. ``finish()`` waits for the writes. A write error is raised by the next ``add`` or by
    ``finish``.

    ``buffer(n, dtype)`` lends a flat tensor to fill and hand to ``add_part``: the writer thread takes it
    back once its bytes are written, and lends it again. A merge that allocated a fresh buffer per piece
    would fault in (and zero) new pages for every byte it writes, which costs more than the merge itself.
    """

    PIECE = 8 << 20  # bytes per queued write: at most QUEUE x PIECE bytes wait for the disk
    QUEUE = 4
    LEND = 16 << 20  # bytes of a lent buffer (a larger request gets a buffer of its own)

    def __init__(self, folder: str, layout: ShardLayout, names: Optional[Sequence[str]] = None, on_done=None,
                 queue: int = QUEUE):
        import queue as _queue

        self.folder = folder
        self.layout = layout
        order = names if names is not None else [t.name for s in layout.shards for t in s]
        by_name = {t.name: t for s in layout.shards for t in s}
        self._order = [by_name[n] for n in order]
        self._next = 0
        self._part = 0  # bytes of the current tensor handed over so far (add_part)
        self._fds: Dict[int, int] = {}
        self._crc = 0
        self.kind = checksum_kind()
        self._on_done = on_done
        self._q: "_queue.Queue" = _queue.Queue(maxsize=max(1, queue))
        self._error: Optional[BaseException] = None
        self._free: "collections.deque" = collections.deque()  # lent buffers written out, ready to lend again
        self._lent: Dict[int, torch.Tensor] = {}  # data pointer of a lent piece -> its buffer
        self._thread = threading.Thread(target=self._work, name="fastmerge-writer", daemon=True)
        self._thread.start()

    def _fd(self, si: int) -> int:
        if si not in self._fds:
            self._fds[si] = os.open(os.path.join(self.folder, self.layout.names[si]), os.O_WRONLY)
        return self._fds[si]

    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is not None:
                continue
            name, data, offset, last, lent = job
            try:
                si = self.layout.where[name][0]
                if data is not None and len(data):
                    _write_at(self._fd(si), data, offset)
                    self._crc = checksum(data, self._crc, self.kind)
                if lent is not None and len(self._free) <= self._q.maxsize:
                    self._free.append(lent)
                if last:
                    if self._on_done is not None:
                        self._on_done(name, self._crc)
                    self._crc = 0
            except BaseException as e:  # reported to the caller by add() / finish()
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _planned(self, name: str, dtype: torch.dtype) -> OutTensor:
        self._raise()
        if self._next >= len(self._order):
            raise RuntimeError(f"writer: {name} is not one of this writer's tensors (internal error)")
        planned = self._order[self._next]
        if planned.name != name or dtype != planned.dtype:
            raise RuntimeError(f"writer: expected {planned.name} {planned.dtype}, got {name} {dtype} (internal error)")
        return planned

    def buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of ``n`` entries to fill and pass to ``add_part`` (see the class notes)."""
        nbytes = n * itemsize(dtype)
        if nbytes > self.LEND:
            return torch.empty(n, dtype=dtype)
        try:
            buf = self._free.pop()
        except IndexError:
            buf = torch.empty(self.LEND, dtype=torch.uint8)
        piece = buf[:nbytes].view(dtype)
        while len(self._lent) >= self.QUEUE:  # lent but never handed over (a pass that changed its plan)
            del self._lent[next(iter(self._lent))]
        self._lent[piece.data_ptr()] = buf
        return piece

    def _put(self, name: str, t: Optional[torch.Tensor], last: bool) -> None:
        offset = self.layout.where[name][1] + self._part
        if t is None or t.numel() == 0:
            self._q.put((name, None, offset, last, None))
            return
        lent = self._lent.pop(t.data_ptr(), None)
        data = memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        for a in range(0, len(data), self.PIECE):
            piece = data[a:a + self.PIECE]
            end = a + self.PIECE >= len(data)
            self._q.put((name, piece, offset + a, last and end, lent if end else None))
        self._part += len(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (the next one of this writer's order)."""
        planned = self._planned(name, tensor.dtype)
        if tuple(tensor.shape) != planned.shape or self._part:
            raise RuntimeError(f"writer: expected {planned.name} {list(planned.shape)}, got {list(tensor.shape)} "
                               f"(internal error)")
        self._put(name, tensor, True)
        self._part = 0
        self._next += 1

    def add_part(self, name: str, part: torch.Tensor, last: bool) -> None:
        """Write the next entries of the next tensor (flat, in order); ``last`` closes it."""
        planned = self._planned(name, part.dtype)
        self._put(name, part, last)
        if last:
            if self._part != planned.nbytes:
                raise RuntimeError(f"writer: {planned.name} got {self._part} bytes of {planned.nbytes} (internal error)")
            self._part = 0
            self._next += 1

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def _close_files(self) -> None:
        for fd in self._fds.values():  # no fsync: the folder's rename is what marks a merge complete
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def finish(self) -> None:
        """Wait until every byte handed over is written (raises the first write error)."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer: {len(self._order) - self._next} planned tensors were not written (internal error)")
        self._stop()
        self._raise()
        self._close_files()

    def drain(self) -> None:
        """Write what was handed over (a tensor cut short stays unrecorded), then close the files."""
        self._stop()
        self._close_files()

    def abort(self) -> None:
        """Stop the writer thread (dropping what waits) and close the files."""
        import queue as _queue

        while True:
            try:
                self._q.get_nowait()
            except _queue.Empty:
                break
        self._stop()
        self._close_files()


def parse_size(text) -> int:
    """``5B``, ``2G``, ``500M``, ``1.5GB``, ``1GiB`` or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    mult = 1
    for suffix, m in (("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
                      ("KB", 1000), ("MB", 1000 ** 2), ("GB", 1000 ** 3), ("TB", 1000 ** 4),
                      ("K", 1000), ("M", 1000 ** 2), ("G", 1000 ** 3), ("T", 1000 ** 4), ("B", 1000 ** 3)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    try:
        v = float(s) * mult
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}: use a number of bytes or a suffix such as 500M, 2G, 5B") from None
    if v < 1:
        raise ValueError(f"the size {text!r} must be at least 1 byte")
    return int(v)


def hub_cache_dirs() -> List[str]:
    dirs = []
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(env):
            dirs.append(os.environ[env])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def resolve_model(ref: str, base_dir: Optional[str] = None) -> str:
    """A model reference (a local folder, or ``org/name[@revision]`` in the local Hugging Face cache)
    -> a local folder. Nothing is downloaded."""
    if "+" in ref and not os.path.exists(ref):
        raise CheckpointError(f"model {ref}: LoRA references (model+lora) are not supported; merge the adapter first")
    cands = [ref] + ([os.path.join(base_dir, ref)] if base_dir and not os.path.isabs(ref) else [])
    for c in cands:
        if os.path.isdir(c):
            return os.path.abspath(c)
    name, _, rev = ref.partition("@")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        for cache in hub_cache_dirs():
            repo = os.path.join(cache, "models--" + name.replace("/", "--"))
            if not os.path.isdir(repo):
                continue
            revision = rev or "main"
            refp = os.path.join(repo, "refs", revision)
            if os.path.exists(refp):
                with open(refp) as f:
                    revision = f.read().strip()
            snap = os.path.join(repo, "snapshots", revision)
            if os.path.isdir(snap):
                return snap
    raise CheckpointError(f"model {ref}: not a local folder and not in the Hugging Face cache "
                          f"({', '.join(hub_cache_dirs())}); nothing is downloaded: download it first or give its folder")


def copy_files(src: str, dst: str, names: Iterable[str]) -> List[str]:
    """Copy the files of ``names`` that exist in ``src`` (following links) into ``dst``."""
    import shutil

    done = []
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, n))
            done.append(n)
    return done
