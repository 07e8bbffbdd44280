"""Training metrics: metrics.jsonl (one JSON object per optimizer step), loss.png, optional TensorBoard.

metrics.jsonl is the source of truth (the web UI and `loss.png` read it); TensorBoard is written too
when the ``tensorboard`` package is importable, under the official tag names (spec §6.3).
"""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Iterable

from pipeline.fileio import atomic_output, write_bytes_atomic

# Fields of every metrics.jsonl record, in order.
FIELDS = ("step", "epoch", "loss", "denoise_loss", "mert_loss", "mhubert_loss", "lr", "grad_norm",
          "sec_per_step", "samples_per_s")

# Official TensorBoard tags (spec §6.3) for the fields that have one.
TB_TAGS = {"loss": "train/loss", "denoise_loss": "train/denoising_loss", "mert_loss": "train/mert_loss",
           "mhubert_loss": "train/m-hubert_loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
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
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8"))


def _ema(values: list[float], beta: float = 0.95) -> list[float]:
    out, avg = [], None
    for v in values:
        if math.isfinite(v):
            avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg if avg is not None else float("nan"))
    return out


def plot_loss(records: Iterable[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw loss (raw + smoothed) and the learning rate against the step into ``path`` (atomic).

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
        ax.plot(steps, _ema(values), color=color, linewidth=1.6, label=f"{key} (smoothed)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
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
        self._file = open(self.path, "a", encoding="utf-8")
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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the current line; the UI tails this file
        if self._tb is not None:
            for key, tag in TB_TAGS.items():
                value = record.get(key)
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(tag, value, record["step"])
        if self.plot_every and record["step"] % self.plot_every == 0:
            self._plot_soon()

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
