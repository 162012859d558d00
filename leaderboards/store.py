"""The results store: one SQLite file holding runs, per-step metrics, answers, judgements and results.

* Every write is a transaction; the file is in WAL mode, so a reader never sees half a write and a process
  killed at any point leaves the store as it was after its last committed write.
* The schema version is checked on open: a store of an unknown version is refused, never guessed at.
* Text (model answers, prompts, configs) goes in as parameters, never into SQL strings.
* A finished result is never overwritten: results are keyed by everything that defines them (policy, reference,
  evaluator, track and data hash, split, decoding); asking again returns the stored one.

Tables: ``runs`` (a training run's config, status, result, commit, versions), ``metrics`` (its metrics.jsonl,
one row per step), ``answers`` (one per policy, answer set and item), ``judgements`` (one per evaluator, policy,
reference, answer set and item: both single-order verdicts and the debiased one), ``results`` (the computed
summary of one evaluation, with its stamp).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError

SCHEMA_VERSION = 1
DEFAULT_NAME = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, run_dir TEXT NOT NULL, agent TEXT, track TEXT, annotator TEXT, status TEXT,
    config TEXT NOT NULL, result TEXT, imported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS answers (
    answer_set TEXT NOT NULL, item_id TEXT NOT NULL, policy_id TEXT NOT NULL, prompt TEXT NOT NULL,
    answer TEXT NOT NULL, tokens INTEGER NOT NULL, seconds REAL NOT NULL, policy_annotator_calls INTEGER NOT NULL,
    commit_id TEXT NOT NULL, PRIMARY KEY (answer_set, item_id));
CREATE TABLE IF NOT EXISTS answer_sets (
    answer_set TEXT PRIMARY KEY, policy_id TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judgements (
    judgement_set TEXT NOT NULL, item_id TEXT NOT NULL, policy_first REAL, reference_first REAL, verdict REAL,
    identical INTEGER NOT NULL, policy_answer_sha TEXT NOT NULL, reference_answer_sha TEXT NOT NULL,
    PRIMARY KEY (judgement_set, item_id));
CREATE TABLE IF NOT EXISTS judgement_sets (
    judgement_set TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY, policy_id TEXT NOT NULL, reference_id TEXT NOT NULL, stamp TEXT NOT NULL,
    summary TEXT NOT NULL, created TEXT NOT NULL);
"""


class StoreError(AlignEnvError):
    """The results store cannot be used (unknown schema version, not a store, a conflicting write)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


class ResultStore:
    """``ResultStore(path)``: open (or create) a results store. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"results store {self.path} is a folder; give a file path such as {self.path / DEFAULT_NAME}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a results store (SQLite says: {exc})") from exc

    def _check_schema(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None or row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path} has schema version {row[0] if row else 'none'}; this align-env reads "
                                 f"version {SCHEMA_VERSION} (use a store made by a matching version, or a new file)")
            return
        if tables:
            raise StoreError(f"{self.path} is an SQLite file of something else (tables {sorted(tables)[:5]}), "
                             "not a results store")
        with self.transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- runs -----------------------------------------------------------------------------------------------
    def put_run(self, run_id: str, run_dir: str, config: dict, result: dict | None, metrics: Iterable[dict],
                imported_at: str) -> None:
        """Import a training run and its per-step metrics (replacing an earlier import of the same run: a run
        that was unfinished then may have finished since)."""
        req = config.get("request", {})
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (run_id, run_dir, req.get("agent"), req.get("track"), _dumps(req.get("annotator")),
                        "finished" if result else "unfinished", _dumps(config), _dumps(result) if result else None,
                        imported_at))
            db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                           [(run_id, int(r["step"]), _dumps(r)) for r in metrics])

    def run_metrics(self, run_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in
                self.db.execute("SELECT record FROM metrics WHERE run_id = ? ORDER BY step", (run_id,))]

    # -- answers ----------------------------------------------------------------------------------------------
    def declare_answer_set(self, answer_set: str, policy_id: str, description: dict) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO answer_sets VALUES (?, ?, ?)", (answer_set, policy_id, _dumps(description)))

    def answers(self, answer_set: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT item_id, prompt, answer, tokens, seconds, policy_annotator_calls FROM answers "
                               "WHERE answer_set = ?", (answer_set,))
        return {r[0]: {"prompt": r[1], "answer": r[2], "tokens": r[3], "seconds": r[4], "policy_annotator_calls": r[5]}
                for r in rows}

    def put_answers(self, answer_set: str, policy_id: str, rows: list[dict], commit_id: str) -> None:
        """Add answers (``item_id, prompt, answer, tokens, seconds, policy_annotator_calls``); an answer already
        stored for an item is kept, never replaced."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(answer_set, r["item_id"], policy_id, r["prompt"], r["answer"], int(r["tokens"]),
                             float(r["seconds"]), int(r.get("policy_annotator_calls", 0)), commit_id) for r in rows])

    # -- judgements -------------------------------------------------------------------------------------------
    def declare_judgement_set(self, judgement_set: str, description: dict) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO judgement_sets VALUES (?, ?)", (judgement_set, _dumps(description)))

    def judgements(self, judgement_set: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT item_id, policy_first, reference_first, verdict, identical, policy_answer_sha, "
                               "reference_answer_sha FROM judgements WHERE judgement_set = ?", (judgement_set,))
        return {r[0]: {"policy_first": r[1], "reference_first": r[2], "verdict": r[3], "identical": bool(r[4]),
                       "policy_answer_sha": r[5], "reference_answer_sha": r[6]} for r in rows}

    def put_judgements(self, judgement_set: str, rows: list[dict]) -> None:
        """Add judgements; one already stored for an item is kept, never replaced (so a resumed evaluation
        neither loses nor duplicates a judgement)."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(judgement_set, r["item_id"], r["policy_first"], r["reference_first"], r["verdict"],
                             int(r["identical"]), r["policy_answer_sha"], r["reference_answer_sha"]) for r in rows])

    # -- results ----------------------------------------------------------------------------------------------
    def result(self, result_id: str) -> dict | None:
        row = self.db.execute("SELECT summary FROM results WHERE result_id = ?", (result_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_result(self, result_id: str, policy_id: str, reference_id: str, stamp: dict, summary: dict,
                   created: str) -> dict:
        """Store a finished result once; if one with this id exists it is returned unchanged (never overwritten)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                       (result_id, policy_id, reference_id, _dumps(stamp), _dumps(summary), created))
        return self.result(result_id)

    def results(self) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT summary FROM results ORDER BY created, result_id")]
