"""Benchmark options, machine info, and the markdown/PNG report beside the saved JSON."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from report import write_report


def _pin_glibc_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for the whole run (CPU benchmarks).

    By default glibc raises its mmap threshold as large buffers are freed, so the same 32 MB
    activation page-faults on every call early in a run and comes from the heap later: rows
    timed late ran up to 25% faster than the same code timed early (scripts/ab_cpu.py shows
    the interleaved truth). Pinned, every row sees the allocator a jemalloc/tcmalloc user has.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


GLIBC_PINNED = _pin_glibc_allocator()


def pytest_addoption(parser):
    parser.addoption("--bench-set", default="table", choices=["table", "mgn", "all"], help="shape set")
    parser.addoption("--bench-dtype", default=None, help="compute dtype (default: bf16 on GPU, fp32 on CPU)")


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["ptl_fused"] = {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "driver": _driver(),
        "glibc_allocator_pinned": GLIBC_PINNED,
    }


def _driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    path = getattr(config.option, "benchmark_json", None)
    if path is not None:
        write_report(output_json, str(path))  # a Path (pytest-benchmark >= 4)


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from shapes import SETS

        shapes = SETS[metafunc.config.getoption("--bench-set")]
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])


@pytest.fixture(scope="session")
def dtype(request):
    name = request.config.getoption("--bench-dtype")
    if name is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def pytest_collection_modifyitems(config, items):
    # torch.compile'd CPU kernels leave their OpenMP workers spinning after each call, which
    # measurably slows whatever runs next on a small machine (cifar v1 fwd: cpu backend 1.32x
    # eager's time right after a compile row, 1.02x without). Time every compile row last.
    def is_compile(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("impl") == "compile"

    items.sort(key=is_compile)
