"""Turns pytest-benchmark JSON files (bench/results/*.json) into BENCHMARKS.md tables.

Rows that share op, mode, dtype, shape and device are put side by side: each provider's
median time, achieved rate (FLOP/s for GEMM-like ops, bytes/s for memory-bound ones)
as a share of the ceiling measured in the same run, peak memory, and the speed-up of
"fused" over "reference".

Usage: python bench/report.py bench/results/*.json > BENCHMARKS.md.new
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(b) -> str:
    if b is None:
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _rate(row: dict) -> str:
    ex, t = row["extra_info"], row["stats"]["median"]
    if ex.get("tokens_per_second"):  # training: steady-state throughput, not the call's time
        return f"{ex['tokens_per_second']:,.0f} tokens/s"
    if ex.get("flops"):
        r, ceil = ex["flops"] / t, ex.get("ceiling_gemm_flops")
        return f"{r / 1e12:.2f} TFLOP/s" + (f" ({100 * r / ceil:.0f}%)" if ceil else "")
    if ex.get("bytes"):
        r, ceil = ex["bytes"] / t, ex.get("ceiling_copy_bytes_per_s")
        return f"{r / 1e9:.1f} GB/s" + (f" ({100 * r / ceil:.0f}%)" if ceil else "")
    return "–"


def _peak(ex: dict) -> str:
    """Peak memory; for CUDA training rows also the device pool's peak (caches off)."""
    text = _fmt_bytes(ex.get("peak_bytes"))
    if ex.get("device_peak_bytes"):
        text += f" (device {_fmt_bytes(ex['device_peak_bytes'])})"
    return text


def _shape(shape) -> str:
    if isinstance(shape, dict) and "config" in shape:  # training rows: name the model
        return f"{shape['config']} batch={shape.get('batch')}x{shape.get('seq') or 'data'}"
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def _paired_time(ex: dict, name: str) -> str:
    return (f"{_fmt_time(ex[f'paired_{name}_median_s'])} "
            f"({_fmt_time(ex[f'paired_{name}_iqr_s'])})")


def tables(paths: list[str]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    pairs: list[dict] = []
    sources = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        sources.append(p)
        for row in data.get("benchmarks", []):
            ex = row.get("extra_info", {})
            if "op" not in ex:
                continue
            key = (ex.get("device", "?"), ex["op"], ex.get("mode", ""), ex.get("dtype", ""),
                   _shape(ex.get("shape")))
            if "paired_base" in ex:  # a side-by-side pair: a table of its own
                pairs.append(row)
                continue
            groups[key][ex.get("provider", "?")] = row
    out = []
    by_device: dict[str, list] = defaultdict(list)
    for key in sorted(groups):
        by_device[key[0]].append(key)
    for device, keys in by_device.items():
        first = groups[keys[0]]
        any_row = next(iter(first.values()))["extra_info"]
        out.append(f"### {device}\n")
        commits = sorted({r["extra_info"].get("commit", "?") for k in keys
                          for r in groups[k].values()})
        out.append(f"mlx {any_row.get('mlx')}, commit {', '.join(commits)}; ceilings measured "
                   f"in the same run: GEMM {any_row.get('ceiling_gemm_flops', 0) / 1e12:.2f} "
                   f"TFLOP/s, copy {any_row.get('ceiling_copy_bytes_per_s', 0) / 1e9:.0f} GB/s "
                   "(bytes read + written). Training rows: the time is the whole run, "
                   "compilation included; the rate is the steady-state tokens/s.\n")
        out.append("| op | mode | dtype | shape | provider | median (IQR) | rate (% of ceiling) "
                   "| peak memory | fused speed-up |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for key in keys:
            rows = groups[key]
            ref = rows.get("reference")
            for prov in sorted(rows, key=lambda p: (p != "fused", p)):
                row = rows[prov]
                st = row["stats"]
                speed = ""
                if prov == "fused" and ref is not None:
                    tps, rtps = (row["extra_info"].get("tokens_per_second"),
                                 ref["extra_info"].get("tokens_per_second"))
                    ratio = tps / rtps if tps and rtps else ref["stats"]["median"] / st["median"]
                    speed = f"{ratio:.2f}×"
                out.append(
                    f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {prov} | "
                    f"{_fmt_time(st['median'])} ({_fmt_time(st['iqr'])}) | {_rate(row)} | "
                    f"{_peak(row['extra_info'])} | {speed} |")
        out.append("")
    if pairs:
        out.append("### Side by side (base and fused alternate round by round: `common.paired`)\n")
        out.append("| device | op | mode | shape | calls per evaluation | base median (IQR) "
                   "| fused median (IQR) | fused / base (median of the per-round ratios) "
                   "| rounds | commit |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in sorted(pairs, key=lambda r: (r["extra_info"].get("device", ""),
                                                r["extra_info"]["op"], r["extra_info"]["mode"],
                                                _shape(r["extra_info"].get("shape")),
                                                r["extra_info"].get("paired_per_eval", 1))):
            ex = row["extra_info"]
            base = ex["paired_base"]
            out.append(f"| {ex.get('device', '?')} | {ex['op']} | {ex['mode']} | "
                       f"{_shape(ex.get('shape'))} | {ex.get('paired_per_eval', 1)} | "
                       f"{_paired_time(ex, base)} | "
                       f"{_paired_time(ex, 'fused')} | "
                       f"{ex['paired_fused_ratio']:.2f}× | {ex['paired_rounds']} | "
                       f"{ex.get('commit', '?')} |")
        out.append("")
    out.append("Sources: " + ", ".join(f"`{s}`" for s in sources) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(tables(sys.argv[1:]))
