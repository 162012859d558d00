"""A run's learning curves from its ``metrics.jsonl``: windowed means in a table and a plot.

``align-env curves RUN_DIR`` prints, for each metric, the mean over consecutive windows of steps (default:
four windows) and the change from the first window to the last, and writes ``RUN_DIR/curves.png``. The
windows smooth the per-step noise of small batches (8 pairs per step on CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError
from benchmarks import run_log

DEFAULT_METRICS = ("reward_margin", "reward_accuracy", "loss", "implicit_kl", "reward_mean", "response_length",
                   "pairs_used", "wall_seconds")


def load(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / run_log.METRICS_FILE
    if not path.is_file():
        raise AlignEnvError(f"{run_dir} holds no {run_log.METRICS_FILE}: is it a run folder of `align-env run`?")
    records = run_log.read(path)
    if not records:
        raise AlignEnvError(f"{path} holds no complete step yet")
    return records


def window_bounds(n: int, windows: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` record ranges of ``windows`` consecutive, near-equal runs of ``n`` steps (at most ``n``)."""
    if windows < 1:
        raise AlignEnvError(f"windows must be >= 1, got {windows}")
    windows = min(windows, n)
    bounds = [round(i * n / windows) for i in range(windows + 1)]
    return list(zip(bounds, bounds[1:]))


def windowed(records: list[dict[str, Any]], metric: str, windows: int) -> list[float]:
    """Mean of ``metric`` over each of :func:`window_bounds` (missing and non-finite values skipped)."""
    out = []
    for lo, hi in window_bounds(len(records), windows):
        values = [r[metric] for r in records[lo:hi] if isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def table(records: list[dict[str, Any]], metrics=DEFAULT_METRICS, windows: int = 4) -> list[dict[str, Any]]:
    rows = []
    for metric in metrics:
        if not any(isinstance(r.get(metric), (int, float)) for r in records):
            continue
        means = windowed(records, metric, windows)
        rows.append({"metric": metric, "windows": means, "change": means[-1] - means[0]})
    return rows


def plot(records: list[dict[str, Any]], metrics, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in records)]
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.0 * len(shown)), sharex=True, squeeze=False)
    steps = [r["step"] for r in records]
    for ax, metric in zip(axes[:, 0], shown):
        values = [r.get(metric) if isinstance(r.get(metric), (int, float)) else math.nan for r in records]
        ax.plot(steps, values, ".", alpha=0.4)
        k = max(1, len(values) // 8)  # moving mean over an eighth of the run
        smooth = [_nanmean(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, "-")
        ax.set_ylabel(metric, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def report(run_dir: str | Path, metrics=DEFAULT_METRICS, windows: int = 4, png: bool = True) -> str:
    records = load(run_dir)
    heads = [f"steps {lo + 1}-{hi}" for lo, hi in window_bounds(len(records), windows)]
    rows = table(records, metrics, windows)
    lines = [f"{'metric':<18}" + "".join(f"{h:>14}" for h in heads) + f"{'change':>12}"]
    for row in rows:
        lines.append(f"{row['metric']:<18}" + "".join(f"{v:>14.4g}" for v in row["windows"])
                     + f"{row['change']:>+12.4g}")
    if png:
        lines.append(f"plot: {plot(records, metrics, Path(run_dir) / 'curves.png')}")
    return "\n".join(lines)
