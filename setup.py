"""Build fastmerge._C (fused CPU kernels, always) and the CUDA kernels (when asked for and possible).

Environment switches:
  FASTMERGE_CUDA=auto|0|1     auto (default): build the CUDA kernels when torch has CUDA and nvcc is
                              found; 0: never; 1: always (fail if impossible).
  FASTMERGE_CUDA_ARCHS        CUDA architectures, default "80;90" ("8.0,9.0" and "90a" styles work
                              too); SASS for each, plus PTX of the highest for newer GPUs.
  FASTMERGE_CPU_ISA           CPU instruction-set builds to compile, default "default,avx2,avx512" on
                              x86-64 ("default" elsewhere). The right one is picked at run time; no
                              -march=native anywhere.
  FASTMERGE_CUDA_EMULATOR=0|1 1: also build fastmerge._C_cuda_emu, the CUDA kernels compiled by the host
                              compiler for a CPU emulator of the CUDA execution model (no toolkit
                              needed), which runs them on CPU tensors under FASTMERGE_CUDA_EMULATE=1.
                              For testing the CUDA kernels without a GPU; default 0.
  MAX_JOBS                    parallel compile jobs.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def log(msg: str) -> None:
    print(f"[fastmerge setup] {msg}", flush=True)


# Flags that every C++ translation unit gets. -ffp-contract=off: no silent fused multiply-add, so
# the kernels round exactly like the PyTorch reference (TIES results are compared bit for bit).
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-strict-aliasing", "-fopenmp", "-fno-math-errno"]
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def wanted_isas() -> list[str]:
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    env = os.environ.get("FASTMERGE_CPU_ISA")
    isas = [s.strip().lower() for s in env.split(",")] if env else (["default", "avx2", "avx512"] if is_x86 else ["default"])
    for s in isas:
        if s not in ISA_FLAGS:
            raise SystemExit(f"FASTMERGE_CPU_ISA: unknown instruction set {s!r} (use default, avx2, avx512)")
    if not is_x86:
        isas = ["default"]
    if "default" not in isas:
        isas.insert(0, "default")
    return isas


def resolve_cuda_home() -> None:
    """Point CUDA_HOME at the toolkit when it is not set and torch would guess wrong.

    torch.utils.cpp_extension guesses CUDA_HOME from the directory above `nvcc`; when `nvcc` is a
    wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one) that guess has no headers or
    libraries. Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def cuda_archs() -> list[str]:
    """FASTMERGE_CUDA_ARCHS ("80;90", "8.0,9.0", "90a") as a list like ["80", "90", "90a"]."""
    raw = os.environ.get("FASTMERGE_CUDA_ARCHS", "80;90")
    archs = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower()
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)", tok)
        if not m:
            raise SystemExit(f"FASTMERGE_CUDA_ARCHS: cannot read architecture {tok!r} (use e.g. \"80;90\" or \"8.0,9.0\")")
        arch = m.group(1) + m.group(2) + m.group(3)
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("FASTMERGE_CUDA_ARCHS is empty")
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group(0)), a))


def cuda_decision() -> tuple[bool, str]:
    mode = os.environ.get("FASTMERGE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTMERGE_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTMERGE_CUDA=0"
    resolve_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    has_cuda_torch = torch.version.cuda is not None
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    cuda_dir = os.path.join(CSRC, "cuda")
    has_sources = os.path.isdir(cuda_dir) and any(f.endswith(".cu") for f in os.listdir(cuda_dir))
    reasons = []
    if not has_cuda_torch:
        reasons.append("torch is a CPU-only build")
    if not nvcc:
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if not has_sources:
        reasons.append("this version has no CUDA kernel sources (csrc/cuda/*.cu)")
    if reasons:
        if mode == "1":
            raise SystemExit("FASTMERGE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is available"


def ext_modules_and_cmdclass():
    if os.environ.get("FASTMERGE_CUDA", "auto").strip().lower() != "0":
        resolve_cuda_home()  # before torch.utils.cpp_extension is first imported
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

    isas = wanted_isas()
    log(f"CPU kernels: building instruction sets {', '.join(isas)} (chosen at run time)")
    build_cuda, why = cuda_decision()
    log(("CUDA kernels: building (" if build_cuda else "CUDA kernels: skipped (") + why + ")")

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    defines = [f"-DFASTMERGE_HAVE_{s.upper()}" for s in isas if s != "default"]
    incs = [os.path.join(CSRC, "include"), os.path.join(CSRC, "cpu")]

    class Build(BuildExtension):
        """Compiles the per-instruction-set kernel objects (each needs its own -m flags), then links
        them into the extension with the op layer."""

        def build_extensions(self):
            for ext in self.extensions:
                if ext.name == "fastmerge._C":  # the ISA objects belong to the CPU extension only
                    ext.extra_objects = self._isa_objects() + list(ext.extra_objects or [])
            super().build_extensions()

        def _isa_objects(self) -> list[str]:
            cxx = os.environ.get("CXX", "c++")
            out_dir = os.path.join(os.path.abspath(self.build_temp), "isa")
            os.makedirs(out_dir, exist_ok=True)
            deps = [os.path.join(CSRC, "cpu", f)
                    for f in ("kernels.h", "ties.h", "common.h", "ckpt_kernels.h", "ckpt_types.h", "pool.h")]
            deps.append(os.path.join(CSRC, "include", "fastmerge", "entry_math.h"))
            jobs = []
            for isa in isas:
                src = os.path.join(CSRC, "cpu", f"kernels_{isa}.cpp")
                obj = os.path.join(out_dir, f"kernels_{isa}.o")
                cap = isa.upper()
                cmd = [cxx, "-c", src, "-o", obj, "-fPIC", *CXX_FLAGS, *ISA_FLAGS[isa],
                       f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
                cmd += [f"-I{p}" for p in incs + include_paths()]
                fresh = os.path.exists(obj) and all(os.path.getmtime(obj) > os.path.getmtime(d) for d in deps + [src])
                jobs.append((isa, cmd, obj, fresh))

            def run(job):
                isa, cmd, obj, fresh = job
                if fresh:
                    log(f"kernels[{isa}]: up to date")
                    return obj
                log(f"kernels[{isa}]: compiling")
                subprocess.check_call(cmd)
                return obj

            max_jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=max(1, max_jobs)) as pool:
                return list(pool.map(run, jobs))

    ext = CppExtension(
        name="fastmerge._C",
        sources=[os.path.relpath(os.path.join(CSRC, "cpu", f), ROOT) for f in ("ops_cpu.cpp", "checkpoint_merge.cpp", "pool.cpp")],
        depends=[os.path.relpath(os.path.join(CSRC, "cpu", f), ROOT) for f in ("checkpoint_merge.h", "ckpt_types.h", "common.h", "pool.h")],
        include_dirs=incs,
        extra_compile_args={"cxx": CXX_FLAGS + defines},
        extra_link_args=["-fopenmp"],
    )
    exts = [ext]
    if build_cuda:
        exts.append(cuda_extension())
    if emulator_wanted():
        log("CUDA emulator: building fastmerge._C_cuda_emu (the CUDA kernels for the CPU emulator)")
        exts.append(cuda_emulator_extension())
    return exts, {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


def cuda_extension():
    """fastmerge._C_cuda: csrc/cuda/ops_cuda.cpp and every csrc/cuda/*.cu, for FASTMERGE_CUDA_ARCHS."""
    from torch.utils.cpp_extension import CUDAExtension

    archs = cuda_archs()
    cuda_dir = os.path.join(CSRC, "cuda")
    sources = [os.path.relpath(os.path.join(cuda_dir, "ops_cuda.cpp"), ROOT)]
    sources += sorted(os.path.relpath(os.path.join(cuda_dir, f), ROOT) for f in os.listdir(cuda_dir) if f.endswith(".cu"))
    gencode = []
    for a in archs:
        gencode.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    # nvcc compiles the architectures of one file in parallel; ninja runs files in parallel.
    threads = max(1, min(len(archs) + 1, os.cpu_count() or 1))
    # -fmad=false: no fused multiply-add in device code, so the kernels round like the reference (TIES is
    # compared bit for bit). C++20: what the torch headers (and the CPU extension) need.
    nvcc_flags = ["-O3", "-std=c++20", "-fmad=false", "--expt-relaxed-constexpr", f"--threads={threads}",
                  "-Xcompiler=-ffp-contract=off", *gencode]
    log(f"CUDA kernels: {len(sources) - 1} .cu files + ops_cuda.cpp for sm_{', sm_'.join(archs)} "
        f"(+ PTX compute_{archs[-1]}), nvcc --threads={threads}, -fmad=false")
    return CUDAExtension(
        name="fastmerge._C_cuda",
        sources=sources,
        depends=cuda_depends((".cuh", ".h")),
        include_dirs=[os.path.join(CSRC, "include"), cuda_dir],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", "-ffp-contract=off", f"-DFASTMERGE_CUDA_ARCHS={','.join(archs)}"],
            "nvcc": nvcc_flags,
        },
    )


def cuda_depends(suffixes: tuple[str, ...]) -> list[str]:
    """Files of csrc/cuda with these suffixes, and the shared headers: the files a CUDA extension's
    build units include, so that editing one rebuilds it (setuptools otherwise compares only the
    listed sources with the built library)."""
    cuda_dir = os.path.join(CSRC, "cuda")
    inc_dir = os.path.join(CSRC, "include", "fastmerge")
    paths = [os.path.join(cuda_dir, f) for f in sorted(os.listdir(cuda_dir)) if f.endswith(suffixes)]
    paths += [os.path.join(inc_dir, f) for f in sorted(os.listdir(inc_dir))]
    return [os.path.relpath(p, ROOT) for p in paths]


def emulator_wanted() -> bool:
    mode = os.environ.get("FASTMERGE_CUDA_EMULATOR", "0").strip().lower()
    if mode not in ("0", "1"):
        raise SystemExit(f"FASTMERGE_CUDA_EMULATOR must be 0 or 1, got {mode!r}")
    return mode == "1"


def cuda_emulator_extension():
    """fastmerge._C_cuda_emu: the sources of csrc/cuda built by the host compiler with
    FASTMERGE_CUDA_EMULATION (csrc/cuda_emu/*.cpp include them), registered for the CPU key."""
    from torch.utils.cpp_extension import CppExtension

    emu_dir = os.path.join(CSRC, "cuda_emu")
    sources = sorted(os.path.relpath(os.path.join(emu_dir, f), ROOT) for f in os.listdir(emu_dir) if f.endswith(".cpp"))
    # -O1: these objects serve the tests, and the emulator's cost is its fiber switches, not the math.
    flags = ["-O1", "-std=c++20", "-ffp-contract=off", "-fno-strict-aliasing", "-DFASTMERGE_CUDA_EMULATION",
             "-DFASTMERGE_CUDA_ARCHS=emulated"]
    return CppExtension(
        name="fastmerge._C_cuda_emu",
        sources=sources,
        depends=cuda_depends((".cu", ".cuh", ".h", ".cpp")),  # the build units include all of csrc/cuda
        include_dirs=[os.path.join(CSRC, "include"), os.path.join(CSRC, "cuda")],
        extra_compile_args={"cxx": flags},
    )


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=["fastmerge", "fastmerge.data", "fastmerge.kernels", "fastmerge.benchmarks"],
    package_data={"fastmerge": ["configs/*.json"]},
    package_dir={"fastmerge": "fastmerge", "fastmerge.kernels": "kernels", "fastmerge.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
