"""The read-ahead threads of ``fastmerge merge`` and the page-cache helpers the cold benchmark uses:
every byte read once, in order, never past the allowed limit; files dropped from the page cache and
measured with mincore."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from fastmerge.merge import readahead as RA


def _file(path, n, seed=0):
    data = bytes((i * 131 + seed) % 251 for i in range(n))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def fadvise_drops_pages(tmp_path) -> bool:
    """Whether this file system drops a synced file's pages on POSIX_FADV_DONTNEED, asked directly (not
    through the helpers under test): mincore over a fresh mapping of a written, synced, dropped file."""
    import ctypes
    import mmap

    n = 16 * mmap.PAGESIZE
    path = _file(tmp_path / "probe", n, 7)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return False
        vec = (ctypes.c_ubyte * 16)()
        ok = libc.mincore(addr, n, vec) == 0
        libc.munmap(addr, n)
    finally:
        os.close(fd)
    return ok and not any(v & 1 for v in vec)


def test_split_covers_every_byte_in_order():
    segs = [("a", 10, 25), ("b", 0, 0), ("c", 7, 8)]
    assert RA.split(segs, 10) == [("a", 10, 10), ("a", 20, 10), ("a", 30, 5), ("c", 7, 8)]
    assert RA.split([], 10) == []


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_read_ahead_reads_each_piece_once_and_stops_at_the_limit(tmp_path, threads, monkeypatch):
    files = [_file(tmp_path / f"f{i}", 10_000 + 997 * i, i) for i in range(3)]
    segs = [(files[0], 100, 4000), (files[1], 0, 10_997), (files[2], 5, 6000)]
    total = sum(n for _, _, n in segs)
    taken = []
    real = os.preadv

    def spy(fd, bufs, off):
        # the file behind the descriptor, asked of the system at the time of the read
        taken.append((os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), off, len(bufs[0])))
        return real(fd, bufs, off)

    monkeypatch.setattr(RA.os, "preadv", spy)
    ra = RA.ReadAhead(segs, threads=threads, limit=5000, piece=1024, skip_cached=False)
    time.sleep(0.2)
    # only pieces that start below the limit: the first segment's four (the last of 928 bytes), then the
    # second segment's first piece from byte 4000; the next would start at 5024
    assert ra.bytes_read == sum(n for _, _, n in ra.pieces[:5]) == 5024
    # the 1024-byte pieces of the segments, in order: 4 + 11 + 6 of them
    pieces = [(f, o, min(1024, a + n - o)) for f, a, n in segs for o in range(a, a + n, 1024)]
    assert ra.pieces == pieces and len(pieces) == 21
    pieces = [(os.path.realpath(f), o, n) for f, o, n in pieces]
    assert sorted(taken) == sorted(pieces[:5])
    ra.allow(1 << 40)
    ra.join()
    assert ra.bytes_read == total
    # every piece read, none twice, nothing else
    assert len(set(taken)) == len(taken) and sorted(taken) == sorted(pieces)


def test_read_ahead_skips_what_is_cached(tmp_path):
    """A piece whose pages are all in the page cache is not read again (a warm merge copies nothing
    twice); after the file is dropped from the cache, it is read."""
    f = _file(tmp_path / "f", 100_000)
    RA.read_files([f])
    ra = RA.ReadAhead([(f, 0, 100_000)], threads=2, limit=1 << 40, piece=8192)
    ra.join()
    assert (ra.bytes_read, ra.skipped) == (0, 100_000)
    if not fadvise_drops_pages(tmp_path):
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
    RA.evict([f])
    assert RA.resident_share([f]) == 0.0
    ra = RA.ReadAhead([(f, 0, 100_000)], threads=1, limit=1 << 40, piece=8192)
    ra.join()
    # the first piece is read; the kernel's own read-ahead may bring in the next ones, which are skipped
    assert ra.bytes_read >= 8192 and ra.bytes_read + ra.skipped == 100_000
    assert RA.resident_share([f]) == 1.0


def test_read_ahead_close_stops_waiting_threads(tmp_path):
    f = _file(tmp_path / "f", 50_000)
    ra = RA.ReadAhead([(f, 0, 50_000)], threads=2, limit=0, piece=4096)
    time.sleep(0.05)
    assert ra.bytes_read == 0
    ra.close()
    assert not any(t.is_alive() for t in ra._threads)


def test_read_ahead_reports_a_missing_file(tmp_path):
    gone = str(tmp_path / "gone")
    ra = RA.ReadAhead([(gone, 0, 10)], threads=1, limit=1 << 40)
    with pytest.raises(FileNotFoundError, match=re.escape(gone)):
        ra.join()


def test_evict_and_resident_share(tmp_path):
    """A written and synced file is dropped from the page cache (none of it, or almost none, stays), and a
    read brings it all back; mincore counts pages, so a partial page counts whole."""
    if not fadvise_drops_pages(tmp_path):
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
    f = _file(tmp_path / "f", (1 << 20) + 123)
    r, pages = RA.resident_pages(f)
    assert pages == ((1 << 20) + 123 + os.sysconf("SC_PAGE_SIZE") - 1) // os.sysconf("SC_PAGE_SIZE")
    RA.evict([f])
    dropped = RA.resident_share([f])
    got = RA.read_files([f], readers=2)
    assert got["bytes"] == (1 << 20) + 123
    assert RA.resident_share([f]) == 1.0
    assert dropped < 0.05
    empty = _file(tmp_path / "e", 0)
    assert RA.resident_pages(empty) == (0, 0) and RA.resident_share([empty]) == 0.0
