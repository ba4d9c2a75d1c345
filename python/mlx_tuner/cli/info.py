"""``mlx-tuner info``: which fused kernels this build has, per op and device."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show which fused kernels this build has")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import __version__, ops

    info = ops.backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"mlx-tuner {__version__} on mlx {ext['installed_mlx']}")
    print(f"extension: {'loaded' if ext['loaded'] else 'not used'} ({ext['reason']})")
    print(f"GPU backend of this build: {ext['gpu_backend'] or 'none'}")
    for op, entry in info["ops"].items():
        have = ", ".join(entry["kernels"]) or "none"
        print(f"  {op:22s} fused kernels on: {have}")
        for dev, why in entry["missing"].items():
            print(f"  {'':22s}   {dev}: {why}")
        if "note" in entry:
            print(f"  {'':22s}   note: {entry['note']}")
    return 0
