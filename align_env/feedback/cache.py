"""A judgement cache keyed on (annotator spec, kind, request, responses, order).

In memory by default; ``cache=disk`` (``$ALIGN_ENV_CACHE/judgements.sqlite``) or ``cache=<path>`` keeps
judgements across processes so that re-evaluations and resumed runs do not pay twice. Abstentions are
not cached (they may be transient), nor are the verdicts of annotators with ``cacheable = False``
(noisy pools) or non-deterministic ones.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from align_env.feedback.base import FeedbackCost, Prompt, Verdict, as_item, check_batch


class JudgementStore:
    """Key -> verdict; a dict, or a SQLite table when given a path."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self._mem: dict[str, float] = {}
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, verdict REAL NOT NULL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: list[str]) -> dict[str, float]:
        if self.path is None:
            return {k: self._mem[k] for k in keys if k in self._mem}
        found: dict[str, float] = {}
        with self._lock, self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, verdict FROM judgements WHERE key IN ({marks})", chunk))
        return found

    def put_many(self, rows: dict[str, float]) -> None:
        if self.path is None:
            self._mem.update(rows)
            return
        with self._lock, self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?)", list(rows.items()))


def judgement_key(spec: str, kind: str, prompt: Prompt, *responses: str) -> str:
    item = as_item(prompt)
    payload = json.dumps([spec, kind, item.prompt, item.reference, item.history, *responses], ensure_ascii=False,
                         default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CachedAnnotator:
    """Wraps an annotator; only cache misses reach it (and count in its cost)."""

    def __init__(self, inner, store: JudgementStore, spec: str):
        self.inner, self.store, self.spec = inner, store, spec
        self.deterministic = getattr(inner, "deterministic", False)
        self.hits = 0

    @property
    def cost(self) -> FeedbackCost:
        return getattr(self.inner, "cost", FeedbackCost())

    def __getattr__(self, name):  # bind(), last_details, engine... of the wrapped annotator
        return getattr(self.inner, name)

    def _cached(self, kind: str, prompts, cols: tuple, call) -> list[Verdict]:
        keys = [judgement_key(self.spec, kind, p, *(c[k] for c in cols)) for k, p in enumerate(prompts)]
        known = self.store.get_many(keys)
        missing = [k for k, key in enumerate(keys) if key not in known]
        self.hits += len(keys) - len(missing)
        out: list[Verdict] = [known.get(key) for key in keys]
        if missing:
            fresh = call([prompts[k] for k in missing], *([c[k] for k in missing] for c in cols))
            new = {}
            for k, v in zip(missing, fresh):
                out[k] = v
                if v is not None:
                    new[keys[k]] = float(v)
            self.store.put_many(new)
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        return self._cached("pairwise", list(prompts), (list(a), list(b)), self.inner.pairwise)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        return self._cached("score", list(prompts), (list(responses),), self.inner.score)
