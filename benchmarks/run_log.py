"""The per-step metrics log of a run: one JSON object per line in ``metrics.jsonl``, keyed by ``step``.

Lines are flushed and fsync'ed as they are written. When a run resumes from checkpoint ``k``,
:func:`truncate` keeps exactly the records of steps ``1..k`` (dropping later ones and a half-written
last line), so the resumed run continues the log with no duplicate and no missing step. The log must be
consistent with the checkpoint: a missing log, a malformed line among the kept ones (named by line number)
or a record of step ``k`` whose counters differ from the checkpoint's is an error, never a silent restart
of the record.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError
from benchmarks.checkpoint import fsync_dir

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy numbers become Python numbers, NaN and infinities become None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def scan(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """``([(line number, record)], [(line number, problem)])`` of a log; a torn last line is not a problem."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    torn_last = not raw.endswith(b"\n")
    records, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if not (torn_last and number == len(lines)):
                problems.append((number, f"not JSON ({exc})"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"a JSON {type(record).__name__}, not an object"))
            continue
        records.append((number, record))
    return records, problems


def read(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate(path: Path, step: int, counters: dict[str, Any] | None = None) -> int:
    """Keep the records of steps ``1..step`` (rewritten atomically); returns how many were dropped.

    ``counters`` (the checkpoint's) must agree with the record of ``step`` on every integer counter.
    """
    path = Path(path)
    if path.is_dir():
        raise AlignEnvError(f"{path} is a folder, not the run's metrics log")
    if not path.exists():
        if step == 0:
            return 0
        raise AlignEnvError(f"{path} is missing but the checkpoint is at step {step}: the records of steps 1..{step} "
                            "are lost, so the run cannot continue its log; start it again in a new folder")
    scanned, problems = scan(path)
    records = [r for _, r in scanned]
    bad = [(n, why) for n, why in problems]
    bad += [(n, f"step {r.get('step')!r} is not a positive integer") for n, r in scanned
            if isinstance(r.get("step"), bool) or not isinstance(r.get("step"), int) or r["step"] < 1]
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in sorted(bad)[:5])
        raise AlignEnvError(f"{path} has malformed lines ({shown}); the log was edited or damaged")
    kept = [r for r in records if r["step"] <= step]
    if [r["step"] for r in kept] != list(range(1, step + 1)):
        raise AlignEnvError(f"{path} does not hold the records of steps 1..{step} that the checkpoint needs "
                            f"(found steps {[r.get('step') for r in kept][:10]}...); the log was edited or lost")
    if counters and kept:
        last = kept[-1]
        differ = [k for k, v in counters.items() if isinstance(v, int) and not isinstance(v, bool) and k in last
                  and last[k] != v]
        if differ:
            raise AlignEnvError(f"{path}: the record of step {step} disagrees with the checkpoint on "
                                + ", ".join(f"{k} ({last[k]} logged, {counters[k]} checkpointed)" for k in differ[:4])
                                + "; the log belongs to another run or was edited")
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(records) - len(kept)


class MetricsLog:
    """Appends one record per step; each line is flushed and fsync'ed before the next step starts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
