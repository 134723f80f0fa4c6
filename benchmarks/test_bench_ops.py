"""pytest-benchmark suite of the fastmerge ops, fused (cpu) and reference backends.

Not part of the normal test suite (the project's testpaths is tests/); run it with

    pytest benchmarks/                                  # d = 200,000, T = 8, fp32
    FASTMERGE_BENCH_SIZE=2M pytest benchmarks/ --benchmark-group-by=group
    FASTMERGE_BENCH_SIZE=vit pytest benchmarks/ -k cpu  # the full ViT-B-32 visual-tower size

Environment:
    FASTMERGE_BENCH_SIZE   elements per vector: 200000 (default), 1e6, 2M, ... or "vit"
    FASTMERGE_BENCH_TASKS  number of task vectors (default 8)
    FASTMERGE_BENCH_DTYPE  fp32 (default), bf16 or fp16

The inputs are those of ``fastmerge bench`` (synthetic task vectors with the block structure of
open_clip ViT-B-32's visual tower, scaled to the size). At sizes of 20 M elements and more the
reference runs once per op (one reference TIES at the ViT size takes about a minute and ~16 GB).
Each benchmark records the op's minimal memory traffic and the resulting GB/s in extra_info.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

import fastmerge  # noqa: E402
from fastmerge.benchmarks import cases  # noqa: E402

SIZE_TEXT = os.environ.get("FASTMERGE_BENCH_SIZE", "200000")
TASKS = int(os.environ.get("FASTMERGE_BENCH_TASKS", "8"))
DTYPE = os.environ.get("FASTMERGE_BENCH_DTYPE", "fp32")
SINGLE_SHOT = 20_000_000

BACKENDS = [b for b in ("cpu", "reference") if b in fastmerge.available_backends("cpu")]


@pytest.fixture(scope="module")
def inputs():
    layout = cases.model_layout()
    d = layout.numel if cases.is_model_token(SIZE_TEXT) else cases.parse_count(SIZE_TEXT)
    x = cases.make_inputs(d, TASKS, cases.DTYPES[DTYPE], layout.offsets_for(d), with_grad=True)
    yield x
    del x
    fastmerge.empty_cache()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", cases.OP_NAMES)
def test_op(benchmark, inputs, op_name, backend):
    op = cases.OPS[op_name]
    fn = op.bind(inputs, backend)
    benchmark.group = f"{op_name} d={inputs.d} T={inputs.T} {DTYPE}"
    min_bytes = op.min_bytes(inputs.T, inputs.d, inputs.elt)
    benchmark.extra_info.update({"op": op_name, "backend": backend, "d": inputs.d, "T": inputs.T,
                                 "dtype": DTYPE, "min_bytes": min_bytes})
    if backend == "reference" and inputs.d >= SINGLE_SHOT:
        result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    else:
        result = benchmark(fn)
    if op.is_ties and backend == "cpu":
        st = fastmerge.ties_stats()
        benchmark.extra_info.update({"strategy": st["strategy"], "passes": st["passes"],
                                     "bracket_misses": st["bracket_misses"]})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["GBps"] = min_bytes / stats.stats.median / 1e9
    if op.phases:
        assert set(result) == {"forward", "backward"}
    elif op_name in ("task_vector_cosine",):
        assert tuple(result.shape) == (inputs.T, inputs.T)
    elif op_name == "block_scale_backward":
        assert tuple(result.shape) == (inputs.T, inputs.num_blocks)
    else:
        assert result.numel() == inputs.d
