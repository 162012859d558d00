"""Corrupt state is detected and never trusted: checkpoints, the model cache and the judgement cache, each for a
truncated file, a flipped byte in the middle and a file of the wrong type (real files, real SQLite, real
safetensors; the resume-from-a-corrupt-checkpoint runs with a real agent are in test_loop.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import checkpoint as ckpt

DAMAGES = ("truncate", "flip", "wrong_type")


def damage(path: Path, how: str) -> None:
    """Truncate ``path`` to half, flip its middle byte, or replace it with a file of another type."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        buf = bytearray(data)
        buf[len(buf) // 2] ^= 0x5A
        path.write_bytes(bytes(buf))
    elif how == "wrong_type":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * max(0, len(data) - 8))  # same size, another kind of file
    else:
        raise AssertionError(how)


# -- checkpoints -------------------------------------------------------------------------------------------------
def _agent_files(folder: Path) -> None:
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "trainer.pt").write_bytes(b"optimizer-state" * 100)
    (folder / "agent.json").write_text(json.dumps({"name": "x", "lr": 1e-5}))


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["agent/adapter/adapter_model.safetensors", "agent/trainer.pt", "agent/agent.json",
                                  "state.json"])
def test_every_file_of_a_checkpoint_is_verified(tmp_path, name, how):
    for step in (2, 4):
        ckpt.write_checkpoint(tmp_path, step, {"step": step, "counters": {"step": step}}, _agent_files)
    folder = ckpt.list_checkpoints(tmp_path)[-1][1]
    ckpt.verify_checkpoint(folder)  # intact
    damage(folder / name, how)
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"step-00000004: {name} "):
        ckpt.verify_checkpoint(folder)
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.read_checkpoint_state(folder)
    said = []
    step, intact = ckpt.latest_intact_checkpoint(tmp_path, say=said.append)
    assert step == 2 and intact.name == "step-00000002"
    assert name in said[0] and "set aside as corrupt-step-00000004" in said[0]
    assert said[1] == "resuming from the previous intact checkpoint, step 2 (step-00000002)"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]


def test_missing_extra_and_folder_in_place_of_file(tmp_path):
    ckpt.write_checkpoint(tmp_path, 1, {"step": 1}, _agent_files)
    folder = ckpt.list_checkpoints(tmp_path)[-1][1]
    (folder / "agent" / "stray.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CorruptCheckpointError, match="files it was not written with"):
        ckpt.verify_checkpoint(folder)
    (folder / "agent" / "stray.bin").unlink()
    (folder / "agent" / "trainer.pt").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="trainer.pt is missing"):
        ckpt.verify_checkpoint(folder)
    (folder / "agent" / "trainer.pt").mkdir()
    with pytest.raises(ckpt.CorruptCheckpointError, match="trainer.pt is a folder where a file"):
        ckpt.verify_checkpoint(folder)
    damage(folder / ckpt.CHECKSUMS_FILE, "truncate")
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksums.json is corrupt"):
        ckpt.verify_checkpoint(folder)
    (folder / ckpt.CHECKSUMS_FILE).unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksums.json is missing"):
        ckpt.verify_checkpoint(folder)
    with pytest.raises(ckpt.CorruptCheckpointError, match="no intact checkpoint to resume from"):
        ckpt.latest_intact_checkpoint(tmp_path, say=lambda _: None)
    assert ckpt.latest_intact_checkpoint(tmp_path / "empty") is None


def test_a_json_file_of_the_wrong_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ckpt.AlignEnvError, match="is a folder where a JSON file should be"):
        ckpt.read_json(tmp_path / "config.json")
    (tmp_path / "result.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ckpt.AlignEnvError, match="is not valid JSON"):
        ckpt.read_json(tmp_path / "result.json")
