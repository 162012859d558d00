"""Resumable pipeline stages with saved, verified outputs (for multi-stage agents such as RLSF-PPO).

Each stage writes its files into a working folder ``<root>/.tmp-<stage>``; when it returns, a manifest
(``stage.json``: the stage's key, its JSON result and the SHA-256 of every file) is written and the folder is
renamed to ``<root>/<stage>``. A stage output is used only when its manifest is there, its key matches (the
stage's inputs: settings and the keys of the stages it reads) and every file still has its recorded hash.
Otherwise, missing, corrupt, half-written or stale, it is removed and recomputed: never half-used.

A stage may continue its own interrupted work: its working folder is kept across a crash and handed to the
next attempt (the reward-model stage checkpoints there); ``fresh=True`` stages start from an empty one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.checkpoint import fsync_tree, write_json_atomic

MANIFEST = "stage.json"


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-able inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _hash_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


class StageStore:
    """Stage outputs under ``root`` (see the module docstring). ``log`` gets one line per decision."""

    def __init__(self, root: Path, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda _msg: None)
        self.recomputed: list[str] = []

    def folder(self, name: str) -> Path:
        return self.root / name

    def check(self, name: str, key: str) -> str | None:
        """Why the saved output of ``name`` cannot be used (None when it can)."""
        folder = self.folder(name)
        if not (folder / MANIFEST).is_file():
            return "missing" if not folder.exists() else "no manifest (half-written)"
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "corrupt manifest"
        if manifest.get("key") != key:
            return f"stale (key {manifest.get('key')} != {key})"
        if _files(folder) != manifest.get("files"):
            return "corrupt (file hashes differ from the manifest)"
        return None

    def result(self, name: str) -> dict[str, Any]:
        return json.loads((self.folder(name) / MANIFEST).read_text(encoding="utf-8"))["result"]

    def run(self, name: str, key: str, compute: Callable[[Path], dict[str, Any]], *,
            fresh: bool = True) -> tuple[Path, dict[str, Any]]:
        """The verified output folder of ``name`` and its result, computing it when it is not usable."""
        problem = self.check(name, key)
        folder = self.folder(name)
        if problem is None:
            self.log(f"stage {name}: reusing the saved output")
            return folder, self.result(name)
        self.log(f"stage {name}: computing ({problem})")
        self.recomputed.append(name)
        if folder.exists():
            shutil.rmtree(folder)
        work = self.root / f".tmp-{name}"
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        result = compute(work)
        write_json_atomic(work / MANIFEST, {"stage": name, "key": key, "result": result, "files": _files(work)})
        fsync_tree(work)
        work.rename(folder)
        return folder, result
