"""A run's learning curves from its ``metrics.jsonl``: windowed means in a table and a plot.

``align-env curves RUN_DIR`` prints, for each metric, the mean over consecutive windows of steps (default:
four windows) and the change from the first window to the last, and writes ``RUN_DIR/curves.png``. The
windows smooth the per-step noise of small batches (8 pairs per step on CPU).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError, did_you_mean
from align_env.redaction import neutralize
from benchmarks import run_log

DEFAULT_METRICS = ("reward_margin", "reward_accuracy", "loss", "implicit_kl", "reward_mean", "response_length",
                   "pairs_used", "wall_seconds")


def load(run_dir: str | Path, warn=None) -> list[dict[str, Any]]:
    """The log's valid records, in step order. Malformed lines (not JSON, not an object, no positive integer
    ``step``, a step seen before) are left out and reported with their line numbers through ``warn`` (default:
    standard error); a torn last line (a run writing or killed mid-line) is left out silently."""
    path = Path(run_dir) / run_log.METRICS_FILE
    if not path.is_file():
        raise AlignEnvError(f"{run_dir} holds no {run_log.METRICS_FILE}: is it a run folder of `align-env run`?")
    records, problems = _valid(*run_log.scan(path))
    if problems:
        (warn or _warn)(f"warning: {path}: {len(problems)} malformed line(s) left out: "
                        + "; ".join(f"line {n}: {why}" for n, why in problems[:10])
                        + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    if not records:
        raise AlignEnvError(f"{path} holds no complete step yet")
    return records


def _valid(scanned, problems) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Records with a positive integer step, each step once; the rest added to the problems."""
    problems, records, seen = list(problems), [], set()
    for number, record in scanned:
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            problems.append((number, f"step {neutralize(repr(step))} is not a positive integer"))
        elif step in seen:
            problems.append((number, f"step {step} again"))
        else:
            seen.add(step)
            records.append(record)
    return sorted(records, key=lambda r: r["step"]), sorted(problems)


def _warn(message: str) -> None:
    print(neutralize(message), file=sys.stderr)


def check_metrics(records: list[dict[str, Any]], metrics) -> None:
    """Every name in ``metrics`` is a metric of the log (did-you-mean otherwise)."""
    known = sorted({k for r in records for k in r if k != "step"})
    for name in metrics:
        if name not in known:
            raise did_you_mean("metric", name, known)


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


def window_labels(records: list[dict[str, Any]], windows: int) -> list[str]:
    """``"steps 1-10"`` per window: the step numbers of its first and last record."""
    return [f"steps {records[lo]['step']}-{records[hi - 1]['step']}" if hi - lo > 1 else f"step {records[lo]['step']}"
            for lo, hi in window_bounds(len(records), windows)]


def report(run_dir: str | Path, metrics=None, windows: int = 4, png: bool = True, warn=None) -> str:
    """The table of windowed means (and the plot's path). ``metrics`` asked for (default: the main ones that
    the log has) must be in the log."""
    records = load(run_dir, warn)
    if metrics:
        check_metrics(records, metrics)
    metrics = tuple(metrics or DEFAULT_METRICS)
    heads = window_labels(records, windows)
    rows = table(records, metrics, windows)
    width = max([14] + [len(h) + 2 for h in heads])
    lines = [f"{'metric':<18}" + "".join(f"{h:>{width}}" for h in heads) + f"{'change':>12}"]
    for row in rows:
        lines.append(f"{row['metric']:<18}" + "".join(f"{v:>{width}.4g}" for v in row["windows"])
                     + f"{row['change']:>+12.4g}")
    if not rows:
        lines.append(f"(no numeric values of {', '.join(metrics)} in the log)")
    elif png:
        lines.append(f"plot: {plot(records, metrics, Path(run_dir) / 'curves.png')}")
    return neutralize("\n".join(lines))
