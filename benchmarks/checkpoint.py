"""Atomic files and checkpoint folders for training runs.

A checkpoint is written into a hidden temporary folder next to its final place, every file and the
folder are fsync'ed, and only then is it renamed to ``checkpoints/step-NNNNNNNN``. A crash at any
moment leaves either the previous checkpoints or the new one complete, never a partial ``step-*``
folder; leftover temporary folders are removed by :func:`clean_partial` when a run resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
AGENT_DIR = "agent"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (bottom-up), then ``root`` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AlignEnvError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove temporary folders and files left by a crash mid-write; returns what was removed."""
    removed = []
    for root in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
                removed.append(child)
    return removed


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any], save_agent: Callable[[Path], None],
                     keep: int = 2) -> Path:
    """Write ``state.json`` and the agent's files (``save_agent(folder)``) as checkpoint ``step``, atomically.

    Keeps the newest ``keep`` checkpoints and deletes older ones only after the new one is in place.
    """
    if keep < 1:
        raise AlignEnvError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / AGENT_DIR).mkdir()
    save_agent(tmp / AGENT_DIR)
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        json.dump(state, f)
    fsync_tree(tmp)
    if final.exists():  # only when a run re-reaches a step it had checkpointed (not in normal resumes)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for _old_step, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / STATE_FILE)
