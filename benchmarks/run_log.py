"""The per-step metrics log of a run: one JSON object per line in ``metrics.jsonl``, keyed by ``step``.

Lines are flushed and fsync'ed as they are written. When a run resumes from checkpoint ``k``,
:func:`truncate` keeps exactly the records of steps ``1..k`` (dropping later ones and a half-written
last line), so the resumed run continues the log with no duplicate and no missing step.
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


def truncate(path: Path, step: int) -> int:
    """Keep the records of steps ``1..step`` (rewritten atomically); returns how many were dropped."""
    path = Path(path)
    records = read(path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    if [r["step"] for r in kept] != list(range(1, step + 1)):
        raise AlignEnvError(f"{path} does not hold the records of steps 1..{step} that the checkpoint needs "
                            f"(found steps {[r.get('step') for r in kept][:10]}...); the log was edited or lost")
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
