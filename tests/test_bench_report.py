"""bench/report.py's verdict tables, on made-up pytest-benchmark results: the GPU run they are
for gets one try, so the tables must be right before it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import report  # noqa: E402


def _row(group: str, impl: str, ms: float, pass_: str, dtype: str = "bfloat16") -> dict:
    calls = 20
    extra = dict(
        impl=impl, shape=group.split()[0], shape_desc="desc", version="v1", pass_=pass_, dtype=dtype,
        flops=1e9, bytes=1e6, saved_bytes=0, calls_per_round=calls, repeat=0,
    )  # fmt: skip
    stats = {"min": ms * 1e-3 * calls, "median": ms * 1e-3 * calls}
    return {"group": group, "extra_info": extra, "stats": stats}


def _report(tmp_path, rows: list[dict]) -> str:
    data = {"machine_info": {"ptl_fused": {"device": "NVIDIA H200"}}, "benchmarks": rows}
    report.write_report(data, str(tmp_path / "r.json"))
    return (tmp_path / "r.md").read_text()


def _line(text: str, section: str, start: str) -> list[str]:
    """The cells of the row that starts with `start` in the section headed `## {section}...`."""
    lines = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0].splitlines()
    line = next(line for line in lines if line.startswith(f"| {start} |"))
    return [c.strip() for c in line.strip("|").split("|")]


TARGETS, IGEMM = "CUDA issue targets", "Implicit-GEMM"


def test_cuda_targets_verdicts_and_fastest_backend(tmp_path):
    rows = [
        # fwd: eager 3.0 ms, cuda 1.9 ms -> 1.58x >= 1.5: met; triton fastest.
        _row("A v1 fwd", "eager", 3.0, "fwd"),
        _row("A v1 fwd", "cuda", 1.9, "fwd"),
        _row("A v1 fwd", "triton", 1.0, "fwd"),
        _row("A v1 fwd", "cuda_igemm", 1.4, "fwd"),  # 1.4 > 1.3 x 1.0: missed
        # fwd+bwd: 1.25x < 1.3: missed; cuda fastest.
        _row("A v1 fwd+bwd", "eager", 5.0, "fwd+bwd"),
        _row("A v1 fwd+bwd", "cuda", 4.0, "fwd+bwd"),
        _row("A v1 fwd+bwd", "triton", 4.5, "fwd+bwd"),
        _row("A v1 fwd+bwd", "cuda_igemm", 5.8, "fwd+bwd"),  # 5.8 <= 1.3 x 4.5 = 5.85: met
    ]
    text = _report(tmp_path, rows)
    # group | dtype | cuda x eager | target | verdict | fastest
    assert _line(text, TARGETS, "A v1 fwd") == ["A v1 fwd", "bfloat16", "1.58", ">= 1.5", "met", "triton"]
    assert _line(text, TARGETS, "A v1 fwd+bwd")[2:] == ["1.25", ">= 1.3", "**missed**", "cuda"]
    assert "fwd cuda_igemm" not in text and "fwd triton: 1" in text and "fwd+bwd cuda: 1" in text
    # group | cuda_igemm ms | cuda / cuda_igemm | triton / cuda_igemm | <= 1.3x triton
    assert _line(text, IGEMM, "A v1 fwd")[1:] == ["1.400", "1.36", "0.71", "**missed**"]
    assert _line(text, IGEMM, "A v1 fwd+bwd")[1:] == ["5.800", "0.69", "0.78", "met"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_targets_judge_only_bf16_rows(tmp_path, dtype):
    # The targets are stated for bf16: other dtypes get the speed-up and no verdict.
    text = _report(
        tmp_path, [_row("B v1 fwd", "eager", 1.0, "fwd", dtype), _row("B v1 fwd", "cuda", 2.0, "fwd", dtype)]
    )
    assert _line(text, TARGETS, "B v1 fwd")[1:] == [dtype, "0.50", "", "", "cuda"]


def test_no_gpu_rows_no_targets_section(tmp_path):
    text = _report(tmp_path, [_row("C v1 fwd", "eager", 1.0, "fwd"), _row("C v1 fwd", "cpu", 0.5, "fwd")])
    assert TARGETS not in text and IGEMM not in text


def test_recompute_table_shares_and_costs(tmp_path):
    def row(impl, ms, saved, weights=100):
        r = _row("D v1 fwd+bwd", impl, ms, "fwd+bwd")
        r["extra_info"].update(saved_bytes=saved, saved_weight_bytes=weights)
        return r

    rows = [row("eager", 6.0, 1000), row("cuda", 3.0, 800), row("cuda+recompute", 4.0, 400)]
    rows.append(row("triton+recompute", 5.0, 650))  # no saving triton row: no time ratio
    del rows[-1]["extra_info"]["saved_weight_bytes"]  # an older result: no weights column
    text = _report(tmp_path, rows)
    section = "Recomputing the gates"
    # group | dtype | impl | saved / eager's | <= 0.6 | without the weights | time / saving's | x eager
    cuda = _line(text, section, "D v1 fwd+bwd")
    assert cuda == ["D v1 fwd+bwd", "bfloat16", "cuda+recompute", "0.40", "met", "0.33", "1.33", "1.50"]
    lines = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    assert "| triton+recompute | 0.65 | **missed** |  |  | 1.20 |" in lines
    # Recomputing rows are options of a backend, not backends "auto" chooses between.
    assert "recompute" not in _line(text, TARGETS, "D v1 fwd+bwd")[-1]
