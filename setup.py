"""Builds ptl_fused._C: the C++ CPU kernels always, the CUDA kernels when CUDA is usable.

Environment:
  PTL_FUSED_WITH_CUDA=0/1   force the CUDA kernels off/on (default: on when the installed
                            torch has CUDA and nvcc is found)
  CUDA_HOME                 the toolkit; derived from nvcc when unset or without libcudart
  TORCH_CUDA_ARCH_LIST      target GPUs (default 9.0, H100/H200, when no GPU is visible)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _has_cudart(home: str | None) -> bool:
    return bool(home) and any(
        glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib", "targets/*/lib")
    )


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit root nvcc itself reports (nvcc may be a wrapper script outside it)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return str(Path(line.split("=", 1)[1].strip()).parent)
    return str(Path(nvcc).resolve().parent.parent)


def _resolve_cuda_home() -> str | None:
    """Set CUDA_HOME before torch.utils.cpp_extension reads it: torch's guess (the parent of
    the nvcc on PATH) has no CUDA runtime when nvcc is a wrapper in /usr/local/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not _has_cudart(home):
        for candidate in (_cuda_home_from_nvcc(), "/usr/local/cuda"):
            if _has_cudart(candidate):
                home = candidate
                break
    if home:
        os.environ["CUDA_HOME"] = home
    return home


CUDA_HOME = _resolve_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _with_cuda() -> bool:
    forced = os.environ.get("PTL_FUSED_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def _cuda_extra_includes() -> list[str]:
    """ATen/cuda/CUDAContext.h needs cusparse.h, which some toolkits lack; the CUDA torch
    wheel's nvidia/cu*/include has it."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # the namespace package of torch's CUDA wheels
    except ImportError:
        return []
    for base in nvidia.__path__:
        for header in sorted(glob.glob(os.path.join(base, "*", "include", "cusparse.h"))):
            return [os.path.dirname(header)]
    return []


WITH_CUDA = _with_cuda()
print(f"ptl_fused: WITH_CUDA={int(WITH_CUDA)} (torch {torch.__version__}, CUDA_HOME={CUDA_HOME})")

# The files built for one instruction set (csrc/cpu/cell_rows_avx*.cpp) link last: an inline
# function of a shared header (c10's Half conversions, a message builder) is emitted by every file
# that uses it, the linker keeps the first copy for all callers, and that copy must be one any
# x86-64 can run. tests/test_extension.py checks the built library for it.
cpu_sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"), key=lambda p: ("_avx" in p.name, p.name))
sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp")) + cpu_sources]
define_macros = [("PTL_FUSED_TORCH_VERSION", f'"{torch.__version__}"')]
extra_compile_args = {"cxx": ["-O3"]}
include_dirs = [str(ROOT / "csrc")]
Extension = CppExtension
if WITH_CUDA:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    define_macros.append(("WITH_CUDA", None))
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    include_dirs += _cuda_extra_includes()
    Extension = CUDAExtension

setup(
    ext_modules=[
        Extension(
            "ptl_fused._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
