"""Benchmark options, machine info, and the markdown/PNG report beside the saved JSON."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform

import pytest
import torch

import ptl_fused
from ptl_fused import _extension

from report import write_report


def _pin_glibc_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for the whole run (CPU benchmarks).

    By default glibc raises its mmap threshold as large buffers are freed, so the same 32 MB
    activation page-faults on every call early in a run and comes from the heap later: rows
    timed late ran up to 25% faster than the same code timed early (seen in interleaved A/B
    runs). Pinned, every row sees the allocator a jemalloc/tcmalloc user has.
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
    parser.addoption(
        "--bench-compile-mode",
        default=None,
        help="torch.compile mode of the compiled python_ref rows (default: max-autotune-no-cudagraphs "
        "on GPU, inductor's default on CPU; 'default' for inductor's default anywhere)",
    )
    parser.addoption(
        "--bench-layout",
        default="nchw",
        choices=["nchw", "channels_last"],
        help="memory format of every 4-D tensor: the cells' inputs, weights and states; the "
        "network rows' model and images",
    )
    parser.addoption(
        "--bench-repeat",
        type=int,
        default=1,
        help="time every row in N blocks, the implementations of a row alternating block by block "
        "(the report keeps each one's fastest block and shows the spread of the per-block ratios)",
    )


def run_rounds(benchmark, fn) -> None:
    """benchmark(fn), leaving the row out of the JSON when the time box's SIGINT stops it: a
    row without rounds made pytest-benchmark fail to write any JSON, and a row cut short would
    have been kept unmarked."""
    try:
        benchmark(fn)
    except KeyboardInterrupt:
        benchmark.has_error = True
        raise


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The run's resolved options, for the test modules (set once by pytest_configure).
_OPTIONS = {"compile_mode": "default", "layout": "nchw"}


def pytest_configure(config):
    mode = config.getoption("--bench-compile-mode")
    if mode is None:
        mode = "max-autotune-no-cudagraphs" if bench_device().type == "cuda" else "default"
    _OPTIONS.update(compile_mode=mode, layout=config.getoption("--bench-layout"))


def memory_format() -> torch.memory_format:
    """The memory format of the run's 4-D tensors (--bench-layout)."""
    return torch.channels_last if _OPTIONS["layout"] == "channels_last" else torch.contiguous_format


def compile_mode() -> str | None:
    """The torch.compile mode of the compile rows (None: inductor's default)."""
    return None if _OPTIONS["compile_mode"] == "default" else _OPTIONS["compile_mode"]


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
        # What was measured: a backend missing (an extension that failed to load) drops its rows.
        "backends": ptl_fused.available_backends(),
        "extension_load_error": None if _extension.LOAD_ERROR is None else str(_extension.LOAD_ERROR),
        "commit": os.environ.get("PTL_FUSED_COMMIT"),  # set by scripts/gpu_check.sh's caller
        "pytest_benchmark": importlib.metadata.version("pytest-benchmark"),
        **_OPTIONS,
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
    except (OSError, subprocess.TimeoutExpired):
        return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    path = getattr(config.option, "benchmark_json", None)
    if path is not None:
        try:  # pytest-benchmark saves the JSON after this hook: a report fault must not lose it
            write_report(output_json, str(path))  # a Path (pytest-benchmark >= 4)
        except Exception as e:  # noqa: BLE001  (report it, keep the measurements)
            print(f"\nbench: the report of {path} failed ({type(e).__name__}: {e}); the JSON is kept")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        from shapes import SETS

        shapes = SETS[metafunc.config.getoption("--bench-set")]
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])
    blocks = metafunc.config.getoption("--bench-repeat")
    if "repeat" in metafunc.fixturenames and blocks > 1:
        metafunc.parametrize("repeat", range(blocks), ids=[f"r{i}" for i in range(blocks)])


@pytest.fixture
def repeat() -> int:
    """Index of the timing block (0 unless --bench-repeat N > 1 parametrizes it)."""
    return 0


@pytest.fixture(scope="session")
def dtype(request):
    name = request.config.getoption("--bench-dtype")
    if name is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def pytest_collection_modifyitems(config, items):
    """Order: each row's implementations side by side, block after block, the whole-network
    rows first (a few rows, and the only ones of their kind: a time box that ends the run early
    cuts per-shape cell rows instead), compile rows last.

    torch.compile'd CPU kernels leave their OpenMP workers spinning after each call, which
    measurably slows whatever runs next on a small machine (cifar v1 fwd: cpu backend 1.32x
    eager's time right after a compile row, 1.02x without), so compile rows run after all others.
    With --bench-repeat N the blocks of a row alternate (eager, cpu, eager, cpu, ...): a drift of
    the machine over minutes (another tenant's load, the allocator's state) then reaches every
    implementation of a row alike instead of favouring whichever was timed in the quiet stretch.
    """

    def params(item) -> dict:
        callspec = getattr(item, "callspec", None)
        return callspec.params if callspec is not None else {}

    rows: dict[tuple, int] = {}

    def key(item):
        p = params(item)
        row = (item.originalname, *((k, str(v)) for k, v in p.items() if k not in ("impl", "repeat")))
        not_network = item.originalname != "test_network_step"
        return p.get("impl") == "compile", not_network, rows.setdefault(row, len(rows)), p.get("repeat", 0)

    items.sort(key=key)  # stable: the implementations keep their order within a block
