"""The ``mlx-tuner`` command. Each subcommand lives in ``cli/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that
runs it and returns the exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands in the order `mlx-tuner --help` lists them; a module not yet written is skipped.
SUBCOMMANDS = ["demo", "lora", "fuse", "bench", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-tuner", description="Fast LoRA/DoRA/QLoRA fine-tuning on MLX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
