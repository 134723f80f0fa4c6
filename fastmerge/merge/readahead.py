"""Reading the inputs from disk ahead of the merge, and what the page cache holds of them.

A merge maps its input files and the kernels fault the pages in. From the page cache that costs
little; from disk, a page fault reads one file's next pages at a time, and the disk waits while the
kernels compute. :class:`ReadAhead` keeps the disk busy instead: a few threads read the inputs in the
order the merge will use them (each tensor chunk by chunk, the models' files side by side), with
``pread`` into small reused buffers, so the bytes land in the page cache (not in the process: the
resident memory does not grow) before the kernels reach them. The merge tells it how far it may get
ahead (:meth:`ReadAhead.allow`), so what it reads is still cached when it is used.

The helpers :func:`evict` and :func:`resident_share` drop a file from the page cache and measure what
of it is still there (``posix_fadvise`` and ``mincore``; no root needed), and :func:`read_files` is
the plain read with concurrent readers that the benchmark compares a merge with.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PIECE = 8 << 20  # bytes per read


def split(segments: Iterable[Tuple[str, int, int]], piece: int = PIECE) -> List[Tuple[str, int, int]]:
    """(file, offset, length) pieces of at most ``piece`` bytes covering the segments, in order."""
    out = []
    for path, start, n in segments:
        a, end = start, start + n
        while a < end:
            out.append((path, a, min(piece, end - a)))
            a += piece
    return out


class _Files:
    """Read-only file descriptors shared by the reader threads (``pread`` needs no seek)."""

    def __init__(self):
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class ReadAhead:
    """Threads that read ``segments`` (file, offset, length), in order, into the page cache.

    Args:
        segments: the byte ranges in the order the merge uses them.
        threads: concurrent readers (a disk serves several requests at once faster than one).
        limit: how many bytes of the sequence may be read before :meth:`allow` raises it.
        skip_cached: pieces whose pages are all in the page cache already (``mincore``) are not read,
            so a merge from a warm cache copies nothing twice.

    ``bytes_read`` counts what the threads read and ``skipped`` what they found cached; :meth:`close`
    stops them (pieces in flight finish).
    """

    def __init__(self, segments: Sequence[Tuple[str, int, int]], threads: int = 4, limit: int = 0,
                 piece: int = PIECE, skip_cached: bool = True):
        self.pieces = split(segments, piece)
        self.ends = []
        pos = 0
        for _, _, n in self.pieces:
            pos += n
            self.ends.append(pos)
        self.total = pos
        self.bytes_read = 0
        self.skipped = 0  # bytes of pieces already in the page cache (not read again)
        self.skip_cached = skip_cached
        self.error: Optional[BaseException] = None
        self._limit = limit
        self._next = 0
        self._read: List[int] = []  # pieces read from storage (not found cached), not yet dropped
        self.dropped = 0
        self._stop = False
        self._cond = threading.Condition()
        self._files = _Files()
        self._threads = [threading.Thread(target=self._work, name=f"fastmerge-read-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def allow(self, upto: int) -> None:
        """Let the readers go up to byte ``upto`` of the sequence."""
        with self._cond:
            if upto > self._limit:
                self._limit = upto
                self._cond.notify_all()

    def drop(self, upto: int) -> None:
        """The merge is done with bytes [0, upto) of the sequence: drop from the page cache the pieces below
        it that the readers brought in from storage (``POSIX_FADV_DONTNEED``), so the page cache holds
        what it held before the merge plus what is still ahead. Left there, pages read once crowd out the
        pages read ahead and not used yet, and the kernel evicts some of those first (they are read twice)."""
        with self._cond:
            done = [i for i in self._read if self.ends[i] <= upto]
            self._read = [i for i in self._read if self.ends[i] > upto]
        for i in done:
            path, off, n = self.pieces[i]
            try:
                os.posix_fadvise(self._files.fd(path), off, n, os.POSIX_FADV_DONTNEED)
                self.dropped += n
            except OSError:
                pass

    def _take(self) -> Optional[int]:
        with self._cond:
            while not self._stop and self._next < len(self.pieces) and \
                    self.ends[self._next] - self.pieces[self._next][2] >= self._limit:
                self._cond.wait()
            if self._stop or self._next >= len(self.pieces):
                return None
            i = self._next
            self._next += 1
            return i

    def _work(self) -> None:
        buf = bytearray(PIECE)
        view = memoryview(buf)
        try:
            while True:
                i = self._take()
                if i is None:
                    return
                path, off, n = self.pieces[i]
                fd = self._files.fd(path)
                if self.skip_cached and _cached(fd, off, n):
                    with self._cond:
                        self.skipped += n
                    continue
                got = 0
                while got < n:
                    k = os.preadv(fd, [view[:min(n - got, len(buf))]], off + got)
                    if k <= 0:
                        break
                    got += k
                with self._cond:
                    self.bytes_read += got
                    self._read.append(i)
        except BaseException as e:  # a read error surfaces where the merge reads the same bytes
            self.error = e

    def join(self) -> None:
        """Wait until every piece was read (the limit must allow it), then release the files; raises the
        first read error."""
        for t in self._threads:
            t.join()
        self._files.close()
        if self.error is not None:
            raise self.error

    def close(self, drop: bool = False) -> None:
        """Stop the threads (pieces in flight finish); with ``drop``, then :meth:`drop` every piece."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        if drop:
            self.drop(1 << 62)
        self._files.close()


def evict(paths: Iterable[str]) -> None:
    """Drop the files' pages from the page cache (``fsync``, then ``POSIX_FADV_DONTNEED``; no root
    needed). Pages that some process still maps stay."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = None


def _page_flags(fd: int, off: int, n: int) -> bytes:
    """``mincore``'s byte per page of bytes [off, off + n) of the open file (bit 0: in the page cache),
    over a mapping that is never touched, so the count does not disturb what it counts."""
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc()
    page = mmap.PAGESIZE
    lo = off // page * page
    size = off + n - lo
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if _LIBC.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bytes(vec)
    finally:
        _LIBC.munmap(addr, size)


def _cached(fd: int, off: int, n: int) -> bool:
    """Whether every page of bytes [off, off + n) of the open file is in the page cache (False where
    that cannot be told)."""
    try:
        return all(v & 1 for v in _page_flags(fd, off, n))
    except OSError:
        return False


def resident_pages(path: str) -> Tuple[int, int]:
    """(pages of the file in the page cache, pages of the file)."""
    size = os.path.getsize(path)
    if not size:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = _page_flags(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} for {path}") from None
    finally:
        os.close(fd)
    return sum(1 for v in flags if v & 1), len(flags)


def resident_share(paths: Sequence[str]) -> float:
    """The share of the files' pages that are in the page cache (0 to 1)."""
    got = total = 0
    for p in paths:
        r, n = resident_pages(p)
        got += r
        total += n
    return got / total if total else 0.0


def read_files(paths: Sequence[str], readers: int = 1, piece: int = PIECE) -> Dict[str, float]:
    """Read every byte of the files with ``readers`` concurrent threads, each taking the next piece in
    order: the plain read a merge is compared with. Returns bytes and seconds."""
    segs = [(p, 0, os.path.getsize(p)) for p in paths]
    t0 = time.perf_counter()
    ra = ReadAhead(segs, threads=readers, limit=1 << 62, piece=piece, skip_cached=False)
    ra.join()
    return {"bytes": ra.bytes_read, "seconds": time.perf_counter() - t0, "readers": readers}


__all__ = ["ReadAhead", "evict", "resident_pages", "resident_share", "read_files", "split"]
