"""Atomic files and checkpoint folders for training runs.

A checkpoint is written into a hidden temporary folder next to its final place, every file and the
folder are fsync'ed, and only then is it renamed to ``checkpoints/step-NNNNNNNN``. A crash at any
moment leaves either the previous checkpoints or the new one complete, never a partial ``step-*``
folder; leftover temporary folders are removed by :func:`clean_partial` when a run resumes.

Every checkpoint carries ``checksums.json``: the size and SHA-256 of every file it holds (``state.json`` and
the agent's files). :func:`verify_checkpoint` checks them before anything is loaded, so a truncated file, a
flipped byte or a folder where a file should be is a :class:`CorruptCheckpointError` naming the file, never
weights silently off. :func:`latest_intact_checkpoint` (what a resume uses) sets a corrupt checkpoint aside
(renamed ``corrupt-step-NNNNNNNN``) and falls back to the previous intact one, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align_env.errors import AlignEnvError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
AGENT_DIR = "agent"
CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = 1
CORRUPT_PREFIX = "corrupt-"
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
    path = Path(path)
    if path.is_dir():
        raise AlignEnvError(f"{path} is a folder where a JSON file should be; the run folder is damaged")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlignEnvError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc


class CorruptCheckpointError(AlignEnvError):
    """A checkpoint whose files do not match its checksums (truncated, flipped, replaced or missing)."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS_FILE)


def write_checksums(folder: Path) -> None:
    """Record the size and SHA-256 of every file under ``folder`` in ``folder/checksums.json``."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
             for name in _files(folder)}
    with open(folder / CHECKSUMS_FILE, "w", encoding="utf-8") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "files": files}, f, indent=1, sort_keys=True)


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first file of ``folder`` that does not match its checksum."""
    folder = Path(folder)
    sums_path = folder / CHECKSUMS_FILE
    if not sums_path.is_file():
        what = "a folder" if sums_path.is_dir() else "missing"
        raise CorruptCheckpointError(f"checkpoint {folder}: {CHECKSUMS_FILE} is {what}, so its files cannot be "
                                     "verified (damaged, or written by an older align-env)")
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
        files = sums["files"]
        if sums.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict) or STATE_FILE not in files:
            raise ValueError("unexpected layout")
        expected = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"checkpoint {folder}: {CHECKSUMS_FILE} is corrupt ({exc})") from None
    for name, (size, digest) in sorted(expected.items()):
        path = folder / name
        if path.is_dir():
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is a folder where a file of {size} bytes "
                                         "should be")
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is missing")
        got = path.stat().st_size
        if got != size:
            kind = "truncated" if got < size else "longer than written"
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is {kind} ({got} bytes, {size} written)")
        if file_digest(path) != digest:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} does not match its SHA-256 (same size, "
                                         "changed content: a flipped or overwritten byte)")
    extra = sorted(set(_files(folder)) - set(expected))
    if extra:
        raise CorruptCheckpointError(f"checkpoint {folder}: holds files it was not written with: {extra[:5]}")


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
        if match:  # only a finished write makes a step-* name; one without state.json is damaged
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
    write_checksums(tmp)
    fsync_tree(tmp)
    if final.exists():  # only when a run re-reaches a step it had checkpointed (not in normal resumes)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for _old_step, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint_state(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after :func:`verify_checkpoint` (unless ``verify=False``)."""
    if verify:
        verify_checkpoint(folder)
    state = read_json(Path(folder) / STATE_FILE)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint {folder}: {STATE_FILE} holds {type(state).__name__}, not an object")
    return state


def set_aside(folder: Path) -> Path:
    """Rename a corrupt checkpoint to ``corrupt-step-NNNNNNNN`` (kept for inspection, never resumed from)."""
    folder = Path(folder)
    target = folder.with_name(CORRUPT_PREFIX + folder.name)
    k = 1
    while target.exists():
        target = folder.with_name(f"{CORRUPT_PREFIX}{folder.name}.{k}")
        k += 1
    os.rename(folder, target)
    fsync_dir(folder.parent)
    return target


def latest_intact_checkpoint(run_dir: Path, *, say: Callable[[str], None] | None = None) -> tuple[int, Path] | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; corrupt newer ones are set aside, saying so.

    None when the run has no checkpoint. When it has checkpoints but none is intact, that is an error: the
    run cannot continue where it was, and starting it over silently would lose its record.
    """
    say = say or (lambda message: print(f"align-env: warning: {message}", file=sys.stderr))
    found = list_checkpoints(run_dir)
    problems = []
    for step, folder in reversed(found):
        try:
            read_checkpoint_state(folder)
        except AlignEnvError as exc:
            moved = set_aside(folder)
            problems.append(str(exc))
            say(f"{exc}; set aside as {moved.name}")
            continue
        if problems:
            say(f"resuming from the previous intact checkpoint, step {step} ({folder.name})")
        return step, folder
    if problems:
        raise CorruptCheckpointError(f"{run_dir}: no intact checkpoint to resume from ({'; '.join(problems)}); "
                                     "start the run again in a new folder")
    return None
