"""Turns a pytest-benchmark JSON into a markdown table and a PNG beside it."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from shapes import PEAKS


def _peaks(device: str):
    return next((p for name, p in PEAKS.items() if name in device), None)


def _merge(benchmarks: list[dict], impl_key: str) -> list[dict]:
    """One entry per (group, implementation) over its timing blocks (--bench-repeat): the
    fastest block's min, the median of the blocks' medians, and every block's min."""
    merged: dict[tuple[str, str], dict] = {}
    for b in benchmarks:
        e = b.get("extra_info", {})
        if impl_key not in e:
            continue
        m = merged.setdefault((b["group"], e[impl_key]), {"group": b["group"], "extra_info": e, "blocks": {}})
        calls = e.get("calls_per_round", 1)  # a round of the cell rows: that many calls, one sync
        m["blocks"][e.get("repeat", 0)] = {k: b["stats"][k] / calls for k in ("min", "median")}
    for m in merged.values():
        m["min"] = min(s["min"] for s in m["blocks"].values())
        m["median"] = statistics.median(s["median"] for s in m["blocks"].values())
    return list(merged.values())


def _block_ratios(base: dict, row: dict) -> str:
    """Range of base/row min-time ratios over the blocks timed side by side."""
    ratios = [base["blocks"][r]["min"] / s["min"] for r, s in row["blocks"].items() if r in base["blocks"]]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def write_report(data: dict, json_path: str) -> None:
    rows = _merge(data["benchmarks"], "impl")
    net_rows = _merge(data["benchmarks"], "net_impl")
    if not rows and not net_rows:
        return
    info = data["machine_info"].get("ptl_fused", {})
    peaks = _peaks(info.get("device", ""))
    blocked = any(len(b["blocks"]) > 1 for b in rows)
    calls = max((b["extra_info"].get("calls_per_round", 1) for b in rows), default=1)
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in rows:
        by_group[b["group"]][b["extra_info"]["impl"]] = b
    lines = [
        f"# BConv-Cell benchmark: {info.get('device')}",
        "",
        f"torch {info.get('torch')}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
        f"triton {info.get('triton')}, driver {info.get('driver')}; {data.get('datetime', '')}"
        + (f"; compile rows: torch.compile mode={info['compile_mode']}" if info.get("compile_mode") else "")
        + f"; tensors {info.get('layout', 'nchw')}"
        + (
            "; glibc malloc thresholds pinned (bench/conftest.py)"
            if info.get("glibc_allocator_pinned")
            else ""
        ),
        "",
        "Fastest (min) and median of the rounds; speed-ups, GB/s and TFLOP/s use the min, the "
        "estimate least disturbed by other load. `x eager` / `x compile` = speed-up over eager / "
        "torch.compile'd python_ref (>1 is faster); GB/s from the forward's compulsory bytes (fwd "
        "rows); TFLOP/s from the gate (+recovery) conv FLOPs (x3 for fwd+bwd); saved = bytes "
        "autograd keeps for backward (unique storages)."
        + (
            f" Cell rows on a GPU: a round is {calls} calls back to back and one synchronize, over "
            "copies of the inputs that exceed twice the L2 cache; times are per call."
            if calls > 1
            else ""
        )
        + (
            f" Each row was timed in {max(len(b['blocks']) for b in rows)} blocks, a row's "
            "implementations alternating block by block (--bench-repeat): min = the fastest "
            "block's, median = the median of the blocks' medians, `x eager per block` = the "
            "range of the speed-ups over eager measured block by block."
            if blocked
            else ""
        ),
        "",
        "| shape | cell | pass | impl | dtype | min ms | median ms | x eager "
        + ("| x eager per block " if blocked else "")
        + "| x compile | GB/s | TFLOP/s "
        + ("| x roofline " if peaks else "")
        + "| saved MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if blocked else "")
        + ("---|" if peaks else "")
        + "---|",
    ]
    for impls in by_group.values():
        eager = impls.get("eager", {}).get("min")
        comp = impls.get("compile", {}).get("min")
        for impl, b in impls.items():
            e, t = b["extra_info"], b["min"]
            gbs = f"{e['bytes'] / t / 1e9:.1f}" if e["pass_"] in ("fwd", "eval") else ""
            cols = [
                e["shape_desc"],
                e["version"],
                e["pass_"],
                impl,
                e["dtype"],
                f"{t * 1e3:.3f}",
                f"{b['median'] * 1e3:.3f}",
                f"{eager / t:.2f}" if eager else "",
                *([_block_ratios(impls["eager"], b) if eager else ""] if blocked else []),
                f"{comp / t:.2f}" if comp else "",
                gbs,
                f"{e['flops'] / t / 1e12:.3f}",
            ]
            if peaks:
                bound = max(e["flops"] / peaks[0], (e["bytes"] / peaks[1]) if e["pass_"] != "fwd+bwd" else 0)
                cols.append(f"{t / bound:.2f}")
            cols.append(f"{e['saved_bytes'] / 2**20:.1f}")
            lines.append("| " + " | ".join(cols) + " |")
    lines += _eval_vs_training(rows)
    lines += _fused_gemm(by_group)
    lines += _recompute(by_group)
    lines += _cuda_targets(by_group)
    lines += _network(net_rows)
    out = Path(json_path)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if by_group:
        _plot(by_group, out.with_suffix(".png"), info.get("device", ""))


def _eval_vs_training(rows: list[dict]) -> list[str]:
    """Eval (the zero-state shortcut) time over the same backend's training forward time, and
    v2 eval over v1 eval (targets of the inference issue: <= 0.8 on GEMM-bound shapes; <= 1.1)."""
    keys = ("shape", "version", "pass_", "impl")
    t = {tuple(b["extra_info"][k] for k in keys): b["min"] for b in rows}
    out = []
    for (shape, version, pass_, impl), te in t.items():
        tf = t.get((shape, version, "fwd", impl))
        if pass_ != "eval" or tf is None or impl in ("eager", "compile"):
            continue
        v1 = t.get((shape, "v1", "eval", impl))  # None where that row did not run
        out.append(f"| {shape} | {version} | {impl} | {te / tf:.2f} | {f'{te / v1:.2f}' if v1 else ''} |")
    if not out:
        return []
    return [
        "",
        "## Eval shortcut vs training forward (min times; the fwd rows run without grad)",
        "",
        "| shape | cell | impl | eval / no-grad training fwd | eval / v1 eval |",
        "|---|---|---|---|---|",
        *out,
    ]


# Targets of the CUDA issue (bf16 on H100/H200): the cuda backend's speed-up over eager
# python_ref per pass, and cuda_igemm's time at most IGEMM_VS_TRITON x Triton's.
CUDA_TARGETS = {"fwd": 1.5, "fwd+bwd": 1.3}
IGEMM_VS_TRITON = 1.3
GPU_BACKENDS = ("cuda", "cuda_igemm", "triton")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _fused_gemm(by_group: dict[str, dict[str, dict]]) -> list[str]:
    """The CUDA implicit-GEMM kernel (cuda_igemm) against cuDNN + epilogue (cuda) and Triton,
    with the CUDA issue's target: within IGEMM_VS_TRITON of Triton."""
    out = []
    for group, impls in by_group.items():
        if "cuda_igemm" not in impls:
            continue
        t = impls["cuda_igemm"]["min"]
        ratios = [f"{impls[o]['min'] / t:.2f}" if o in impls else "" for o in ("cuda", "triton")]
        target = _verdict(t <= IGEMM_VS_TRITON * impls["triton"]["min"]) if "triton" in impls else ""
        out.append(f"| {group} | {t * 1e3:.3f} | {' | '.join(ratios)} | {target} |")
    if not out:
        return []
    return [
        "",
        "## Implicit-GEMM kernel vs cuDNN + epilogue and vs Triton (min times; >1: cuda_igemm faster)",
        "",
        f"| group | cuda_igemm ms | cuda / cuda_igemm | triton / cuda_igemm | <= {IGEMM_VS_TRITON}x triton |",
        "|---|---|---|---|---|",
        *out,
    ]


# The Triton issue's memory target: bytes saved for backward at most this share of eager's.
SAVED_VS_EAGER = 0.6


def _recompute(by_group: dict[str, dict[str, dict]]) -> list[str]:
    """Each backend's recomputing row against its saving row and eager python_ref: the bytes
    saved for backward (with the SAVED_VS_EAGER target) and the time it costs."""
    out = []
    for group, impls in by_group.items():
        eager = impls.get("eager")
        if eager is None:
            continue
        for impl, b in impls.items():
            if not impl.endswith("+recompute"):
                continue
            saving = impls.get(impl.removesuffix("+recompute"))
            e, r = eager["extra_info"], b["extra_info"]
            share = r["saved_bytes"] / max(e["saved_bytes"], 1)
            # The weights, which the model holds anyway, left out (absent in older results).
            w_e, w_r = e.get("saved_weight_bytes"), r.get("saved_weight_bytes")
            no_w = (
                ""
                if None in (w_e, w_r)
                else f"{(r['saved_bytes'] - w_r) / max(e['saved_bytes'] - w_e, 1):.2f}"
            )
            time = f"{b['min'] / saving['min']:.2f}" if saving else ""
            out.append(
                f"| {group} | {r['dtype']} | {impl} | {share:.2f} | {_verdict(share <= SAVED_VS_EAGER)} | "
                f"{no_w} | {time} | {eager['min'] / b['min']:.2f} |"
            )
    if not out:
        return []
    return [
        "",
        "## Recomputing the gates in backward (recompute=True): memory kept and time",
        "",
        f"| group | dtype | impl | saved / eager's | <= {SAVED_VS_EAGER} | the same without the weights "
        "| time / saving row's | x eager |",
        "|---|---|---|---|---|---|---|---|",
        *out,
    ]


def _cuda_targets(by_group: dict[str, dict[str, dict]]) -> list[str]:
    """The cuda backend against the CUDA issue's speed-up targets over eager (bf16 rows only:
    the targets are stated for bf16), and the fastest GPU backend of each row, which is what
    AUTO_ORDER in ptl_fused/backends.py should follow."""
    out, wins = [], defaultdict(int)
    for group, impls in by_group.items():
        gpu = {b: impls[b]["min"] for b in GPU_BACKENDS if b in impls}
        if not gpu or "eager" not in impls:
            continue
        e = next(iter(impls.values()))["extra_info"]
        fastest = min(gpu, key=gpu.get)
        wins[(e["pass_"], fastest)] += 1
        target = CUDA_TARGETS.get(e["pass_"]) if e["dtype"] == "bfloat16" else None
        speedup = impls["eager"]["min"] / gpu["cuda"] if "cuda" in gpu else None
        out.append(
            f"| {group} | {e['dtype']} | {'' if speedup is None else f'{speedup:.2f}'} | "
            f"{'' if target is None else f'>= {target}'} | "
            f"{'' if None in (speedup, target) else _verdict(speedup >= target)} | {fastest} |"
        )
    if not out:
        return []
    tally = ", ".join(f"{p} {b}: {n}" for (p, b), n in sorted(wins.items()))
    return [
        "",
        "## CUDA issue targets (cuda backend over eager python_ref, min times) and the fastest GPU backend",
        "",
        "| group | dtype | cuda x eager | target | verdict | fastest GPU backend |",
        "|---|---|---|---|---|---|",
        *out,
        "",
        f"Rows won per pass and backend: {tally}.",
    ]


def _network(rows: list[dict]) -> list[str]:
    """PTLNet step time per cell backend over the plain backbone's, beside the cells' FLOP share."""
    base = {b["extra_info"]["pass_"]: b["min"] for b in rows if b["extra_info"]["net_impl"] == "baseline"}
    out = []
    for b in rows:
        e, t = b["extra_info"], b["min"]
        over = f"{100 * (t / base[e['pass_']] - 1):+.1f}%" if e["pass_"] in base else ""
        share = f"{100 * e['cell_flop_share']:.1f}%"
        out.append(f"| {b['group']} | {e['pass_']} | {e['net_impl']} | {e['batch']} | {e['dtype']} | "
                   f"{t * 1e3:.1f} | {over} | {share} |")  # fmt: skip
    if not out:
        return []
    return [
        "",
        "## Whole network (ResNet-50 PTLNet at 256x128 vs the plain backbone, same head)",
        "",
        "Overhead = step time / plain backbone's - 1; FLOP share = the cells' and fusions' "
        "training-forward FLOPs / the plain network's.",
        "",
        "| group | pass | cells | batch | dtype | min ms | time overhead | FLOP share |",
        "|---|---|---|---|---|---|---|---|",
        *out,
    ]


def _plot(by_group: dict, path: Path, device: str) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the table is written, the plot is not
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(by_group)
    impls = sorted({impl for g in by_group.values() for impl in g}, key=lambda s: (s != "eager", s))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.6), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        speedups = []
        for g in groups:
            eager = by_group[g].get("eager", {}).get("min")
            b = by_group[g].get(impl)
            speedups.append(eager / b["min"] if (b and eager) else 0)
        ax.bar([j + i * width for j in range(len(groups))], speedups, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=60, ha="right", fontsize=7
    )
    ax.set_ylabel("speed-up over eager python_ref (min time)")
    ax.set_title(f"BConv-Cell on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths: list[str]) -> dict:
    """One pytest-benchmark JSON from several runs of the suite (machine info of the first
    readable one); a part that cannot be read (a run killed while writing it) is left out, with
    a message, rather than losing the others."""
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            print(f"report: leaving out {p}: {e}")
    if not runs:
        raise SystemExit("report: no readable results to merge")
    return {**runs[0], "benchmarks": [b for r in runs for b in r["benchmarks"]]}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Tables (.md) and plots (.png) of pytest-benchmark JSONs.")
    p.add_argument("results", nargs="+", help="JSON files: each gets its .md and .png beside it")
    p.add_argument("--merge", metavar="OUT.json", help="join the given runs into OUT.json (+ .md, .png)")
    a = p.parse_args(argv)
    for path in a.results:
        if not Path(path).is_file():
            p.error(f"no such results file: {path}")
    if a.merge:
        merged = merge(a.results)
        Path(a.merge).write_text(json.dumps(merged, indent=2))
        write_report(merged, a.merge)
    else:
        for path in a.results:
            write_report(json.loads(Path(path).read_text()), path)


if __name__ == "__main__":
    main()
