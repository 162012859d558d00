"""A judgement cache keyed on (annotator spec, kind, request, responses, order).

In memory by default; ``cache=disk`` (``$ALIGN_ENV_CACHE/judgements.sqlite``) or ``cache=<path>`` keeps
judgements across processes so that re-evaluations and resumed runs do not pay twice. Abstentions are
not cached (they may be transient), nor are the verdicts of annotators with ``cacheable = False``
(noisy pools) or non-deterministic ones.

The SQLite file is never trusted blindly: one that is not SQLite, fails its integrity check or holds
another program's tables is set aside (renamed ``<name>.corrupt-<n>``) and a fresh cache is built, with a
warning. Each row carries a check of its key and value (a flipped byte makes the row a miss). A cached
value that is not a usable verdict (a pairwise value outside [0, 1], a non-finite
score, not a number) is discarded and judged again. The key covers the weights' identity as well as the
spec (see ``align_env.feedback._with_cache``), and any text (lone surrogates included) can be a key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from align_env.feedback.base import FeedbackCost, Prompt, Verdict, as_item, check_batch


SCHEMA = "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, verdict REAL NOT NULL, tag TEXT NOT NULL)"
APPLICATION_ID = 0x416C4A63  # "AlJc": marks the file as an align-env judgement cache
_COLUMNS = [("key", "TEXT"), ("verdict", "REAL"), ("tag", "TEXT")]


def row_tag(key: str, verdict: float) -> str:
    """A check of one row: a flipped byte in a key or a value makes the row's tag disagree (the row is ignored)."""
    return hashlib.sha256(f"{key}:{float(verdict)!r}".encode()).hexdigest()[:16]


class JudgementStore:
    """Key -> verdict; a dict, or a SQLite table when given a path."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self._mem: dict[str, float] = {}
        self._lock = threading.Lock()
        self.set_aside: list[Path] = []
        if self.path is not None:
            if self.path.parent.exists() and not self.path.parent.is_dir():
                from align_env.errors import AlignEnvError

                raise AlignEnvError(f"judgement cache {self.path}: {self.path.parent} is a file, not a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            problem = self._problem()
            if problem:
                self._rebuild(problem)
            else:
                self._init_db()

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def _init_db(self) -> None:
        with self._connect() as db:
            db.execute(SCHEMA)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _problem(self) -> str | None:
        """Why the file at ``path`` is not a judgement cache we can trust (None when it is one, or absent)."""
        if self.path.is_dir():
            return "it is a folder"
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    return "it is not a SQLite database"
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            try:
                check = db.execute("PRAGMA integrity_check").fetchone()
                if not check or check[0] != "ok":
                    return f"its integrity check failed ({check[0] if check else 'no answer'})"
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                app = db.execute("PRAGMA application_id").fetchone()[0]
                if tables - {"judgements"} or app not in (0, APPLICATION_ID):
                    return f"it belongs to another program (tables {sorted(tables)[:5]}, application id {app})"
                if "judgements" in tables:
                    cols = [(r[1], r[2].upper()) for r in db.execute("PRAGMA table_info(judgements)")]
                    if cols != _COLUMNS:
                        return f"its judgements table has columns {cols}, expected {_COLUMNS}"
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            return f"SQLite cannot read it ({exc})"
        return None

    def _rebuild(self, problem: str) -> None:
        """Set the bad file aside (kept for inspection) and start an empty cache, with a warning."""
        k = 1
        while (aside := self.path.with_name(f"{self.path.name}.corrupt-{k}")).exists():
            k += 1
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            if side.is_file():
                os.replace(side, aside.with_name(aside.name + suffix))
        self.set_aside.append(aside)
        warnings.warn(f"judgement cache {self.path} was unusable ({problem}); set it aside as {aside.name} and "
                      "started an empty cache", RuntimeWarning, stacklevel=3)
        self._init_db()

    def _query(self, run):
        """``run(db)`` on the SQLite file; a file that turns out corrupt mid-use is set aside and rebuilt once."""
        try:
            with self._connect() as db:
                return run(db)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            self._rebuild(f"SQLite error while in use: {exc}")
            with self._connect() as db:
                return run(db)

    def get_many(self, keys: list[str], kind: str | None = None) -> dict[str, float]:
        """The usable verdicts stored under ``keys`` (values that are not usable verdicts of ``kind`` are left out)."""
        if self.path is None:
            found = {k: self._mem[k] for k in keys if k in self._mem}
        else:
            def run(db):
                out = {}
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = db.execute(f"SELECT key, verdict, tag FROM judgements WHERE key IN ({marks})", chunk)
                    out.update((k, v) for k, v, tag in rows if usable(v, None) and tag == row_tag(k, v))
                return out

            with self._lock:
                found = self._query(run)
        return {k: float(v) for k, v in found.items() if usable(v, kind)}

    def put_many(self, rows: dict[str, float]) -> None:
        if self.path is None:
            self._mem.update(rows)
            return
        with self._lock:
            self._query(lambda db: db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?)",
                                                  [(k, float(v), row_tag(k, v)) for k, v in rows.items()]))


def usable(value, kind: str | None) -> bool:
    """A verdict worth serving: a finite number; for pairwise judgements a probability in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return kind != "pairwise" or 0.0 <= value <= 1.0


def judgement_key(spec: str, kind: str, prompt: Prompt, *responses: str) -> str:
    item = as_item(prompt)
    payload = json.dumps([spec, kind, item.prompt, item.reference, item.history, *responses], ensure_ascii=False,
                         default=str)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()  # any text, lone surrogates too


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
        known = self.store.get_many(keys, kind)
        missing = [k for k, key in enumerate(keys) if key not in known]
        self.hits += len(keys) - len(missing)
        out: list[Verdict] = [known.get(key) for key in keys]
        if missing:
            fresh = call([prompts[k] for k in missing], *([c[k] for k in missing] for c in cols))
            new = {}
            for k, v in zip(missing, fresh):
                out[k] = v
                if v is not None and usable(v, kind):
                    new[keys[k]] = float(v)
            self.store.put_many(new)
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        return self._cached("pairwise", list(prompts), (list(a), list(b)), self.inner.pairwise)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        return self._cached("score", list(prompts), (list(responses),), self.inner.score)
