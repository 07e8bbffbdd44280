"""Training metrics: metrics.jsonl (one JSON object per optimizer step), loss.png, optional TensorBoard.

metrics.jsonl is the source of truth (the web UI and `loss.png` read it); TensorBoard is written too
when the ``tensorboard`` package is importable, under the official tag names (spec §6.3).
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from pipeline.fileio import atomic_output, disk_full_guard, write_bytes_atomic, write_json_atomic, write_text_atomic

# Fields of every metrics.jsonl record, in order.
FIELDS = ("step", "epoch", "loss", "denoise_loss", "mert_loss", "mhubert_loss", "lr", "grad_norm",
          "lora_norm", "update_ratio", "sec_per_step", "samples_per_s")
# Fields added to the records of the steps that ran a validation (pipeline.train, docs/training.md).
VAL_FIELDS = ("val_loss", "val_denoise_loss", "val_seconds", "best_step", "best_val_loss")

# Official TensorBoard tags (spec §6.3) for the fields that have one; ours for the others.
TB_TAGS = {"loss": "train/loss", "denoise_loss": "train/denoising_loss", "mert_loss": "train/mert_loss",
           "mhubert_loss": "train/m-hubert_loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
           "lora_norm": "train/lora_norm", "update_ratio": "train/update_ratio",
           "val_loss": "val/loss", "val_denoise_loss": "val/denoising_loss",
           "sec_per_step": "perf/sec_per_step", "samples_per_s": "perf/samples_per_s"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run redoes those steps; no duplicates)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    data = "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8")
    with disk_full_guard(path, len(data)):
        write_bytes_atomic(path, data)


def ema(values: list[float], beta: float = 0.95) -> list[float]:
    """Exponential moving average (the "smoothed" curves), skipping non-finite values."""
    out, avg = [], None
    for v in values:
        if math.isfinite(v):
            avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg if avg is not None else float("nan"))
    return out


def plot_loss(records: Iterable[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw loss (raw + smoothed) with the validation loss, and the learning rate, against the step
    into ``path`` (atomic). (The LoRA norm and update ratio are in the web UI and TensorBoard.)

    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend, no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not records:
        return None
    path = Path(path)
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(8, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, color in (("loss", "tab:blue"), ("denoise_loss", "tab:orange")):
        values = [r.get(key, float("nan")) for r in records]
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema(values), color=color, linewidth=1.6, label=f"{key} (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if val:  # deterministic: drawn as measured, no smoothing
        ax.plot(*zip(*val), color="black", marker="o", markersize=3, linewidth=1.2, label="val_loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with disk_full_guard(path), atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


class MetricsLogger:
    """Appends one record per step; redraws loss.png every ``plot_every`` steps, on a background
    thread (a drawing takes about a second; the training step does not wait for it).

    Disabled (every method a no-op) on ranks other than 0.
    """

    def __init__(self, run_dir: str | Path, plot_every: int = 50, tensorboard: bool = True,
                 enabled: bool = True, title: str = ""):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.png = self.run_dir / "loss.png"
        self.plot_every = plot_every
        self.title = title
        self._records: list[dict[str, Any]] = []
        self._file = None
        self._tb = None
        self._plotter: threading.Thread | None = None
        self._plot_error: BaseException | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._records = read_metrics(self.path)
        # Unbuffered: a line that failed to reach the disk (full) is not retried by close().
        self._file = open(self.path, "ab", buffering=0)
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / "tensorboard")

    @property
    def last(self) -> dict[str, Any]:
        return self._records[-1] if self._records else {}

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._records.append(record)
        line = (json.dumps(record) + "\n").encode("utf-8")
        with disk_full_guard(self.path, len(line)):  # a crash loses at most this line; the UI tails the file
            while line:
                line = line[self._file.write(line):]
        if self._tb is not None:
            for key, tag in TB_TAGS.items():
                value = record.get(key)
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(tag, value, record["step"])
        if self.plot_every and record["step"] % self.plot_every == 0:
            self._plot_soon()

    def sync(self) -> None:
        """Flush metrics.jsonl to disk (with each checkpoint: a power cut keeps what it covers)."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def plot(self) -> Path | None:
        """Redraw loss.png now (after a background drawing, if one runs)."""
        if not self.enabled:
            return None
        self._join_plotter()
        return plot_loss(self._records, self.png, self.title)

    def _plot_soon(self) -> None:
        """Start a drawing of the records so far, unless one still runs (the next request, or the
        final plot(), draws the newer records). A failed drawing raises here, on the next request."""
        if self._plotter is not None and self._plotter.is_alive():
            return
        self._join_plotter()
        self._plotter = threading.Thread(target=self._draw, args=(list(self._records),), name="loss.png", daemon=True)
        self._plotter.start()

    def _draw(self, records: list[dict[str, Any]]) -> None:
        try:
            plot_loss(records, self.png, self.title)
        except BaseException as exc:  # handed to the training thread
            self._plot_error = exc

    def _join_plotter(self) -> None:
        if self._plotter is not None:
            self._plotter.join()
            self._plotter = None
        error, self._plot_error = self._plot_error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if not self.enabled:
            return
        if self._plotter is not None:
            self._plotter.join()  # a drawing's error is not raised here: close() runs as the loop unwinds
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _tensorboard_writer(folder: Path):
    """A SummaryWriter if the optional ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a broken tensorboard install: metrics.jsonl still works
        return None
    return SummaryWriter(log_dir=str(folder))


# ------------------------------------------------------------------ DVC's view of a finished run
# dvc.yaml's train stage writes these two files into one fixed folder (so `dvc exp show` gives every
# experiment the same columns and `dvc plots diff` overlays the runs) and its top-level `plots:` draw them.
DVC_METRICS = "train.json"
DVC_PLOTS = "train_steps.json"
# Columns of train_steps.json. DVC treats a list as plot data only when every row has the same keys, and a
# plot naming a missing column fails: so val_loss is always there (null without a validation set).
PLOT_FIELDS = ("loss", "denoise_loss", "mert_loss", "mhubert_loss", "val_loss", "lr")


def run_metrics(summary: dict[str, Any], records: list[dict[str, Any]], **measured: Any) -> dict[str, Any]:
    """A run's numbers as one flat mapping (each key becomes a `dvc exp show` column): steps, the final
    loss (raw, and smoothed as in loss.png), the best loss and its step (validation loss when the
    records have it, else the smoothed training loss), speed, ``measured`` (peak memory, samples/s) and
    the checkpoint. Keys the trainer's summary adds under best_* / val_* are passed through."""
    losses = [r for r in records if _finite(r.get("loss"))]
    smoothed = ema([r["loss"] for r in losses])
    val = [r for r in records if _finite(r.get("val_loss"))]
    out: dict[str, Any] = {"steps": summary.get("step")}
    if losses:
        out.update(loss=losses[-1]["loss"], loss_smoothed=smoothed[-1])
    if val:
        out["val_loss"] = val[-1]["val_loss"]
    scored = [(r["val_loss"], r["step"]) for r in val] or list(zip(smoothed, (r["step"] for r in losses)))
    if scored:
        out["best_loss"], out["best_step"] = min(scored)
    out.update(sec_per_step=summary.get("sec_per_step"), **measured, checkpoint=summary.get("checkpoint"))
    out.update({k: v for k, v in summary.items()
                if k.startswith(("best_", "val_")) and isinstance(v, (str, int, float))})
    return {k: v for k, v in out.items() if v is not None}


def write_dvc_files(folder: str | Path, summary: dict[str, Any], records: list[dict[str, Any]],
                    **measured: Any) -> tuple[Path, Path]:
    """Write ``folder``/train.json (run_metrics) and ``folder``/train_steps.json (one row per step:
    PLOT_FIELDS and any other val_* field, null where a step has none) atomically; return both paths."""
    folder = Path(folder)
    columns = list(PLOT_FIELDS) + sorted({k for r in records for k in r if k.startswith("val_")} - set(PLOT_FIELDS))
    rows = [{"step": r["step"], **{k: r[k] if _finite(r.get(k)) else None for k in columns}}
            for r in records if "step" in r]
    metrics_path, plots_path = folder / DVC_METRICS, folder / DVC_PLOTS
    write_json_atomic(metrics_path, run_metrics(summary, records, **measured))
    # one row per line: thousands of steps stay a readable file
    write_text_atomic(plots_path, "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return metrics_path, plots_path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
