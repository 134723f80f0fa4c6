"""The Triton TIES kernels compile for the GPU (sm_80 and sm_90) on a machine without one.

The interpreter tests (tests/triton) run the kernels' semantics on CPU tensors, but they never run
Triton's GPU compiler: this test does (frontend, LLVM, ptxas), so a kernel that the interpreter
accepts but the compiler rejects fails here. It also checks that the aligned TIES pass gets
128-bit vector loads.
"""

from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastmerge import _ops  # noqa: E402

pytestmark = pytest.mark.skipif(_ops.triton_interpret(), reason="the interpreter cannot compile for a GPU")

PASS_PTRS = {"tab": "*i64", "b_ptr": "*fp32", "out_ptr": "*fp32", "w_ptr": "*fp32", "lam_ptr": "*fp32",
             "item_seg": "*i64", "item_start": "*i64", "item_end": "*i64", "c_ptr": "*fp32", "lo_ptr": "*fp32",
             "hi_ptr": "*fp32", "cnt_ptr": "*i64", "cand_val": "*fp32", "cand_pos": "*i64", "cbase_ptr": "*i64",
             "ccap_ptr": "*i64", "tally_ptr": "*i64", "cpos_ptr": "*i64", "cseg_ptr": "*i64", "ccnt_ptr": "*i64",
             "CCAP": "i64", "flag_ptr": "*i32", "S": "i64"}
OPTS = {"num_warps": 8, "enable_fp_fusion": False, "enable_reflect_ftz": False}


def _compile(fn, ptrs, consts, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(ptrs)
    sig.update({k: "constexpr" for k in consts})
    try:
        return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32), options=OPTS)
    except RuntimeError as e:  # no CUDA compiler backend in this Triton build
        if "ptxas" in str(e) and "not found" in str(e):
            pytest.skip(f"Triton's CUDA toolchain is missing: {e}")
        raise


@pytest.fixture(scope="module")
def mt():
    return importlib.import_module("fastmerge.kernels.merge_ties")


@pytest.mark.parametrize("arch", [80, 90])
def test_ties_kernels_compile_for_the_gpu(mt, arch):
    for collect, maj in ((True, False), (False, False), (False, True)):
        consts = dict(T=8, TP=8, MODE=0, HAS_W=False, COLLECT=collect, MAJ_ALL=maj, ACC=tl.float32, PACKED=True,
                      ALIGNED=collect, BLOCK=2048)
        k = _compile(mt._ties_pass.fn, PASS_PTRS, consts, arch)
        if collect:  # full blocks of an aligned pass are loaded 16 bytes at a time
            assert "ld.global.v4" in k.asm["ptx"] or "ld.global.nc.v4" in k.asm["ptx"]
    p64 = {k: v.replace("fp32", "fp64") for k, v in PASS_PTRS.items()}
    _compile(mt._ties_pass.fn, p64, dict(T=13, TP=16, MODE=2, HAS_W=True, COLLECT=True, MAJ_ALL=False,
                                         ACC=tl.float64, PACKED=False, ALIGNED=False, BLOCK=1024), arch)
    fix = {"tab": "*i64", "b_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*fp32", "lam_ptr": "*fp32", "c_ptr": "*fp32",
           "thr_ptr": "*fp32", "cnt_ptr": "*i64", "cand_val": "*fp32", "cand_pos": "*i64", "cbase_ptr": "*i64",
           "ccap_ptr": "*i64", "tally_ptr": "*i64", "cpos_ptr": "*i64", "cseg_ptr": "*i64", "ccnt_ptr": "*i64",
           "CCAP": "i64", "S": "i64"}
    _compile(mt._ties_fixup, fix, dict(T=5, MODE=1, HAS_W=True, ACC=tl.float32, BLOCK=1024), arch)
    maj = {k: fix[k] for k in ("tab", "b_ptr", "out_ptr", "w_ptr", "lam_ptr", "thr_ptr", "tally_ptr", "cpos_ptr",
                               "cseg_ptr", "ccnt_ptr", "CCAP", "S")}
    _compile(mt._ties_majority, maj, dict(T=5, MODE=2, HAS_W=False, ACC=tl.float32, BLOCK=256), arch)
    hc = {"cand_val": "*fp32", "n_ptr": "*i64", "cbase_ptr": "*i64", "ccap_ptr": "*i64", "base_key_ptr": "*i64",
          "prefix_ptr": "*i64", "active_ptr": "*i32", "hist_ptr": "*i64", "SHIFT": "i64", "SHIFT_HI": "i64", "SPAN": "i64"}
    _compile(mt._hist_cand, hc, dict(KEYT=tl.int32, BLOCK=1024), arch)
    hf = {"tab": "*i64", "b_ptr": "*fp16", "w_ptr": "*fp32", "item_seg": "*i64", "item_start": "*i64",
          "item_end": "*i64", "prefix_ptr": "*i64", "active_ptr": "*i32", "hist_ptr": "*i64", "SHIFT": "i64",
          "SHIFT_HI": "i64", "S": "i64"}
    _compile(mt._hist_full, hf, dict(T=8, TP=8, HAS_W=False, ACC=tl.float32, KEYT=tl.int32, BLOCK=256), arch)
