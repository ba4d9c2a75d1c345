"""Training callbacks, as in ``mlx_lm.tuner.callbacks``: ``TrainingCallback``, the wandb and
swanlab reporters (imported only when used; a clear error names the missing package) and
``get_reporting_callbacks``. Beyond mlx-lm: ``MetricsCallback`` keeps the reports and draws
the loss curve (``plot_losses``: matplotlib if installed)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path


class TrainingCallback:
    def on_train_loss_report(self, train_info: dict):
        """Called to report training loss at specified intervals."""

    def on_val_loss_report(self, val_info: dict):
        """Called to report validation loss at specified intervals or the beginning."""


def _serializable(data: dict) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in data.items()}


def _require(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{package} is not installed. please install {package} via: pip install {package}") from None


class _LoggerCallback(TrainingCallback):
    package = ""

    def __init__(self, project_name: str, log_dir: str, config: dict, wrapped_callback: TrainingCallback = None):
        self.lib = _require(self.package)
        self.wrapped_callback = wrapped_callback
        self._init(project_name, log_dir, config)

    def _log(self, info: dict):
        self.lib.log(_serializable(info), step=info.get("iteration"))

    def on_train_loss_report(self, train_info: dict):
        self._log(train_info)
        if self.wrapped_callback:
            self.wrapped_callback.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict):
        self._log(val_info)
        if self.wrapped_callback:
            self.wrapped_callback.on_val_loss_report(val_info)


class WandBCallback(_LoggerCallback):
    package = "wandb"

    def _init(self, project_name, log_dir, config):
        self.lib.init(project=project_name, name=os.path.basename(log_dir), dir=log_dir, config=config)


class SwanLabCallback(_LoggerCallback):
    package = "swanlab"

    def _init(self, project_name, log_dir, config):
        self.lib.init(project=project_name, experiment_name=os.path.basename(log_dir),
                      logdir=os.path.join(log_dir, "swanlog"), config=config)


SUPPORT_CALLBACK = {"wandb": WandBCallback, "swanlab": SwanLabCallback}


def get_reporting_callbacks(report_to: str | None = None, project_name: str | None = None,
                            log_dir: str | None = None, config: dict | None = None):
    """A chain of reporters from a comma-separated ``report_to`` ("wandb,swanlab"), or None."""
    if not report_to:
        return None
    callback = None
    for name in [x.strip().lower() for x in report_to.split(",") if x.strip()]:
        if name not in SUPPORT_CALLBACK:
            raise ValueError(f"{name} callback doesn't exist choose from {', '.join(SUPPORT_CALLBACK)}")
        callback = SUPPORT_CALLBACK[name](project_name=project_name, log_dir=log_dir, config=config,
                                          wrapped_callback=callback)
    return callback


class MetricsCallback(TrainingCallback):
    """Keeps every report (``train`` and ``val`` lists) and passes them on to ``wrapped``."""

    def __init__(self, wrapped_callback: TrainingCallback = None):
        self.train, self.val = [], []
        self.wrapped_callback = wrapped_callback

    def on_train_loss_report(self, train_info: dict):
        self.train.append(_serializable(train_info))
        if self.wrapped_callback:
            self.wrapped_callback.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict):
        self.val.append(_serializable(val_info))
        if self.wrapped_callback:
            self.wrapped_callback.on_val_loss_report(val_info)


def read_metrics(path) -> tuple[list, list]:
    """(train, val) records of a JSON-lines metrics file written by ``train``."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            (val if row.get("type") == "val" else train).append(row)
    return train, val


def plot_losses(path, curves: dict, title: str = "loss") -> str | None:
    """Write a PNG of named curves ``{label: (iterations, losses)}``; returns a one-line
    note instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_metrics_file(metrics_path, png_path, title: str = "loss") -> str | None:
    train, val = read_metrics(metrics_path)
    curves = {"train": ([r["iteration"] for r in train], [r["train_loss"] for r in train])}
    if val:
        curves["validation"] = ([r["iteration"] for r in val], [r["val_loss"] for r in val])
    return plot_losses(png_path, curves, title)
