"""The counter-based random stream of the random methods (DARE, DELLA).

Entry ``i`` of a stream is a pure function of the stream's key and ``i``: 24 bits of the splitmix64
finaliser of ``key + i * 0x9E3779B97F4A7C15`` (mod 2^64). A stream's key hashes the seed, the model
reference and the tensor name, so a given seed gives the same random choices for every entry whatever
the thread count, chunking, device or number of processes. An entry is kept with probability ``p``
when its 24 bits are below ``p * 2**24``.

:func:`stream_bits` is the pure-PyTorch reference (it runs on any device); the CPU kernels compute
the same bits in C++ (``fastmerge._C.ckpt_random_bits`` and inside ``ckpt_merge``).
"""

from __future__ import annotations

import hashlib

import torch

GOLDEN = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB
BITS = 24


def _signed(u: int) -> int:
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= 1 << 63 else u


def stream_key(seed: int, model: str, tensor: str) -> int:
    """The 64-bit key (as a signed int64) of one model's stream over one tensor."""
    h = hashlib.blake2b(f"{int(seed)}\x00{model}\x00{tensor}".encode(), digest_size=8).digest()
    return _signed(int.from_bytes(h, "little"))


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:  # logical shift right of int64 lanes
    return (z >> s) & ((1 << (64 - s)) - 1)


def stream_bits(key: int, start: int, n: int, device="cpu") -> torch.Tensor:
    """Entries ``[start, start + n)`` of the stream ``key``: int64 values in [0, 2^24)."""
    z = torch.arange(start, start + n, dtype=torch.int64, device=device) * _signed(GOLDEN) + _signed(key)
    z = z ^ _lsr(z, 30)
    z = z * _signed(C1)
    z = z ^ _lsr(z, 27)
    z = z * _signed(C2)
    z = z ^ _lsr(z, 31)
    return _lsr(z, 64 - BITS)


def keep_mask(key: int, numel: int, prob, device="cpu") -> torch.Tensor:
    """Boolean keep mask of ``numel`` entries; ``prob`` is a float or a float tensor of ``numel`` entries."""
    bits = stream_bits(key, 0, numel, device).to(torch.float64)
    if isinstance(prob, torch.Tensor):
        return bits < prob.reshape(-1).to(device=device, dtype=torch.float64) * float(1 << BITS)
    return bits < float(prob) * float(1 << BITS)
