"""The ``mlx-tuner`` command: ``info`` (what is compiled where) and, as they land,
``lora``, ``fuse``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-tuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="show which fused kernels this build has")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
