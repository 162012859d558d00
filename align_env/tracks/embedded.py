"""Embedded track data: JSONL files shipped in the package under ``tracks/data/<track>/``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError
from align_env.tracks.track import PreferencePair, PromptItem

DATA_DIR = Path(str(resources.files("align_env.tracks") / "data"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a bad line raises an error naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AlignEnvError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def data_files(track: str) -> dict[str, Path]:
    folder = DATA_DIR / track
    files = {"rubric": folder / "rubric.md", "train": folder / "train.jsonl"}
    files |= {"eval": folder / "eval.jsonl", "pairs": folder / "pairs.jsonl"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise AlignEnvError(f"embedded data for track {track!r} is missing files: {', '.join(missing)}")
    return files


def content_hash(files: dict[str, Path]) -> str:
    """sha256 over the rubric and split files (names and bytes), first 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise AlignEnvError(f"{where}: missing or empty field(s) {missing}")


def load_embedded(track: str, format_prompt: Callable[[str, dict], str]):
    """Read the embedded splits of ``track``: (rubric, train, eval, pairs, hash)."""
    files = data_files(track)
    rubric = files["rubric"].read_text(encoding="utf-8").strip()

    def item(row: dict, where: str) -> PromptItem:
        _require(row, ("id", "prompt"), where)
        meta = dict(row.get("meta") or {})
        return PromptItem(
            id=row["id"],
            prompt=format_prompt(row["prompt"], meta),
            source=row["prompt"],
            reference=row.get("reference"),
            meta=meta,
        )

    splits: dict[str, list] = {}
    for split in ("train", "eval"):
        rows = read_jsonl(files[split])
        splits[split] = [item(r, f"{files[split]}:{i + 1}") for i, r in enumerate(rows)]
    pairs = []
    for i, row in enumerate(read_jsonl(files["pairs"])):
        where = f"{files['pairs']}:{i + 1}"
        _require(row, ("id", "prompt", "chosen", "rejected"), where)
        pairs.append(
            PreferencePair(
                id=row["id"], item=item(row, where), chosen=row["chosen"], rejected=row["rejected"],
                why=row.get("why", ""),
            )
        )
    ids = [x.id for x in splits["train"] + splits["eval"]] + [p.id for p in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise AlignEnvError(f"embedded track {track!r} has duplicate ids: {dup[:5]}")
    return rubric, tuple(splits["train"]), tuple(splits["eval"]), tuple(pairs), content_hash(files)
