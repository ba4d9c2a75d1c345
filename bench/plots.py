"""PNG plots for BENCHMARKS.md from pytest-benchmark JSON files (bench/results/*.json).

    speedup.png          fused speed-up over the reference (mlx-lm's path), per op and shape
    memory_vs_vocab.png  peak memory of the vocabulary-sized ops against the vocabulary size
    train_h200.png       end-to-end training on the H200: tokens/s and peak memory (from
                         train-*-h200.json), and the loss curves when the rows carry them

Usage: python bench/plots.py bench/results   (writes the PNGs next to the JSON files)

A plot whose data is missing is skipped with a note. The CPU loss plot, train_loss.png,
is drawn by bench/bench_train.py.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

VOCAB_OPS = ("linear_cross_entropy", "kl_div", "js_div")
PROVIDERS = {"reference": ("mlx_lm", "tab:gray"), "fused": ("mlx-tuner", "tab:blue")}
METHODS = ("lora", "dora", "qlora")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def load(folder: Path, pattern: str = "*.json") -> list[dict]:
    """The extra_info of every row (plus its median time), files in name order."""
    rows = []
    for path in sorted(folder.glob(pattern)):
        for bench in json.loads(path.read_text()).get("benchmarks", []):
            ex = bench.get("extra_info", {})
            if "op" in ex:
                rows.append({**ex, "median": bench["stats"]["median"]})
    return rows


def pairs(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows keyed by (device, op, mode, dtype, shape), then by provider; the shape key
    sorts numerically (V=32000 before V=131072)."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        shape = tuple((k, type(v).__name__, v) for k, v in (r.get("shape") or {}).items())
        key = (r.get("device", "?"), r["op"], r.get("mode", ""), r.get("dtype", ""), shape)
        out[key][r["provider"]] = r
    return out


def _shape(shape: dict) -> str:
    if "layer" in shape:
        return shape["layer"]
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "r")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same bytes each run
    plt.close(fig)
    print(f"wrote {path}")


def plot_speedup(rows: list[dict], out: Path) -> None:
    by_device = defaultdict(list)
    for (device, op, mode, dtype, _), prov in sorted(pairs(rows).items()):
        if op.startswith("train_") or not {"fused", "reference"} <= prov.keys():
            continue
        mode = mode.replace("_", "+")  # dora's rows say forward_backward
        label = f"{op}  {mode}  {DTYPES.get(dtype, dtype)}  {_shape(prov['fused']['shape'])}"
        by_device[device].append((op, label, prov["reference"]["median"] / prov["fused"]["median"]))
    if not by_device:
        print("speedup.png: no op with both a fused and a reference row; skipped")
        return
    devices = sorted(by_device, key=lambda d: d.startswith("cpu"))  # the GPU first
    sizes = [len(by_device[d]) for d in devices]
    fig, axes = plt.subplots(
        len(devices),
        1,
        figsize=(10, 1.2 + 0.24 * sum(sizes)),
        layout="constrained",
        gridspec_kw={"height_ratios": sizes},
        squeeze=False,
    )
    for ax, device in zip(axes[:, 0], devices):
        ops, labels, ratios = zip(*by_device[device])
        y = range(len(ratios))[::-1]  # first row on top
        for i in range(1, len(ops)):  # a rule between ops
            if ops[i] != ops[i - 1]:
                ax.axhline(y[i] + 0.5, color="0.6", lw=0.6)
        colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
        ax.barh(y, [r - 1 for r in ratios], left=1, color=colors, height=0.7)
        ax.axvline(1, color="black", lw=0.8)
        ax.set_xscale("log")
        lo, hi = min(min(ratios), 1), max(max(ratios), 1)
        ax.set_xlim(lo / 1.8, hi * 2.4)  # room for the labels
        for yi, r in zip(y, ratios):
            ax.text(
                r * 1.06 if r >= 1 else r / 1.06,
                yi,
                f"{r:.2f}×",
                va="center",
                ha="left" if r >= 1 else "right",
                fontsize=7,
            )
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.set_ylim(-0.6, len(ratios) - 0.4)
        ax.set_title(f"{device}: fused speed-up over the reference (median time ratio)", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.25)
    axes[-1, 0].set_xlabel("speed-up (×, log scale; < 1 = slower than mlx-lm's path)")
    _save(fig, out / "speedup.png")


def plot_memory(rows: list[dict], out: Path) -> None:
    # (device, op) -> (mode, dtype, provider) -> [(V, peak bytes)]; a peak <= 0 is a
    # measurement artefact (memory freed below the starting level), so it is left out.
    series: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        peak, shape = r.get("peak_bytes"), r.get("shape") or {}
        if r["op"] in VOCAB_OPS and r["provider"] in PROVIDERS and "V" in shape and (peak or 0) > 0:
            key = (r.get("mode", ""), r.get("dtype", ""), r["provider"] != "reference")
            series[r.get("device", "?"), r["op"]][key].append((shape["V"], peak))
    panels = sorted(
        (
            k
            for k, lines in series.items()
            if len({v for pts in lines.values() for v, _ in pts}) > 1
        ),
        key=lambda k: (k[0].startswith("cpu"), k[0], VOCAB_OPS.index(k[1])),
    )
    for device in sorted({d for d, _ in series} - {d for d, _ in panels}):
        print(f"memory_vs_vocab.png: {device} has one vocabulary size only; left out")
    if not panels:
        print("memory_vs_vocab.png: no op with peak_bytes at two vocabulary sizes; skipped")
        return
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5 * ncols, 4.6 * nrows), squeeze=False, layout="constrained"
    )
    for ax, (device, op) in zip(axes.flat, panels):
        lines = series[device, op]
        variants = sorted({k[:2] for k in lines})
        for (mode, dtype, fused), pts in sorted(lines.items()):
            v, peak = zip(*sorted(pts))
            name = PROVIDERS["fused" if fused else "reference"][0]
            ax.plot(
                v,
                [p / 2**30 for p in peak],
                color=f"C{variants.index((mode, dtype))}",
                marker="s" if fused else "o",
                ls="--" if fused else "-",
                label=f"{name}  {mode} {DTYPES.get(dtype, dtype)}",
            )
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # label 0.2, 0.5, 1, 2, 5, 10 ...
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_fmt(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_title(f"{op} on {device}", fontsize=9)
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("peak memory (GiB, log scale)")
        ax.grid(which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Peak memory against vocabulary size: mlx_lm (solid, circles) vs mlx-tuner "
        "(dashed, squares)",
        fontsize=10,
    )
    _save(fig, out / "memory_vs_vocab.png")


def plot_train(rows: list[dict], out: Path) -> None:
    runs: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (model, method) -> provider -> row
    for r in rows:
        if r["op"].startswith("train_") and r["provider"] in PROVIDERS:
            runs[r["shape"]["config"], r["op"].removeprefix("train_")][r["provider"]] = r
    if not runs:
        print("train_h200.png: no rows in train-*-h200.json; skipped")
        return
    # Only pairs measured side by side: a provider's row alone has no ratio to show.
    cases = sorted((c for c in runs if all(p in runs[c] for p in PROVIDERS)),
                   key=lambda c: (c[0] != "tinyllama", c[0], METHODS.index(c[1])))
    curves = [c for c in cases if all(runs[c].get(p, {}).get("losses") for p in PROVIDERS)]
    # Loss curves four to a row under the bars.
    ncol = min(4, len(curves)) if curves else 1
    nrow = -(-len(curves) // ncol) if curves else 0
    fig = plt.figure(figsize=(12, 4.2 + 2.6 * nrow), layout="constrained")
    upper, lower = (fig.subfigures(2, 1, height_ratios=[4.2, 2.6 * nrow]) if curves
                    else (fig, None))
    axes = upper.subplots(1, 2)
    width = 0.38
    # The CUDA device pool's peak (one counter for MLX's buffers and mlx-tuner's) where every
    # row has it; else MLX's peak (plus mlx-tuner's own: an upper bound).
    device = all(r.get("device_peak_bytes") for c in cases for r in runs[c].values())
    mem_key = "device_peak_bytes" if device else "peak_bytes"
    for ax, key, scale, unit in [
        (axes[0], "tokens_per_second", 1e3, "thousand tokens/s"),
        (axes[1], mem_key, 2**30, "device peak memory (GiB)" if device else "peak memory (GiB)"),
    ]:
        for k, prov in enumerate(PROVIDERS):
            vals = [runs[c].get(prov, {}).get(key, 0) / scale for c in cases]
            x = [i + (k - 0.5) * width for i in range(len(cases))]
            bars = ax.bar(x, vals, width, label=PROVIDERS[prov][0], color=PROVIDERS[prov][1])
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        for i, c in enumerate(cases):  # the ratio over each pair of bars
            ref, fused = (runs[c].get(p, {}).get(key) for p in PROVIDERS)
            if ref and fused:
                ax.text(
                    i,
                    max(ref, fused) / scale * 1.09,
                    f"{fused / ref:.2f}×",
                    ha="center",
                    fontsize=8,
                    weight="bold",
                )
        ax.set_xticks(range(len(cases)), [f"{m}\n{method}" for m, method in cases], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.25)
    axes[0].set_title("steady-state throughput (ratio mlx-tuner / mlx_lm above)", fontsize=9)
    axes[1].set_title(("device pool peak, caches off" if device else "peak memory")
                      + " (ratio mlx-tuner / mlx_lm above)", fontsize=9)
    loss_axes = lower.subplots(nrow, ncol, squeeze=False).ravel() if curves else []
    for ax in loss_axes[len(curves):]:
        ax.set_visible(False)
    for ax, c in zip(loss_axes, curves):
        for prov, style in zip(PROVIDERS, ["-", "--"]):
            losses = runs[c][prov]["losses"]
            ax.plot(
                range(1, len(losses) + 1),
                losses,
                style,
                color=PROVIDERS[prov][1],
                label=PROVIDERS[prov][0],
            )
        ax.set_title(f"{c[0]} {c[1]}: train loss", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    if not curves:
        print("train_h200.png: the training rows carry no per-iteration losses; no loss curves")
    any_row = next(iter(next(iter(runs.values())).values()))
    dtype = DTYPES.get(any_row["dtype"], any_row["dtype"])
    fig.suptitle(f"End-to-end training on {any_row['device']}, {dtype}, random weights "
                 "(data: BENCHMARKS.md)")
    _save(fig, out / "train_h200.png")


def main(folder: str) -> None:
    out = Path(folder)
    rows = load(out)
    plot_speedup(rows, out)
    plot_memory(rows, out)
    plot_train(load(out, "train-*-h200.json"), out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
