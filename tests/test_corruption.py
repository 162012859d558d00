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


# -- the model cache -----------------------------------------------------------------------------------------------
@pytest.fixture
def cache_entry(tiny_lm_dir, tmp_path):
    """A cache entry as ``prepare`` writes it: the tiny model's safetensors, config and tokenizer + manifest."""
    import shutil

    from align_env import models

    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_lm_dir, folder)
    (folder / models.MANIFEST).write_text(json.dumps(models._describe(folder) | {"source": "test"}))
    assert models.cache_entry_ok(folder)
    return folder


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_corrupt_model_cache_entry_is_not_trusted(cache_entry, name, how):
    from align_env import models

    before = models.weights_identity(str(cache_entry))
    damage(cache_entry / name, how)
    assert not models.cache_entry_ok(cache_entry)
    assert models.manifest_digest(cache_entry) is None
    assert models.weights_identity(str(cache_entry)) != before


def test_an_older_manifest_is_checked_then_given_digests(cache_entry):
    from align_env import models

    manifest = json.loads((cache_entry / models.MANIFEST).read_text())
    del manifest["sha256"]
    (cache_entry / models.MANIFEST).write_text(json.dumps(manifest))
    assert models.cache_entry_ok(cache_entry)
    upgraded = json.loads((cache_entry / models.MANIFEST).read_text())
    assert set(upgraded["sha256"]) == set(upgraded["files"]) and upgraded["format"] == models.MANIFEST_FORMAT
    damage(cache_entry / "tokenizer.json", "flip")  # not a safetensors file: only the digest can see this
    assert not models.cache_entry_ok(cache_entry)


def test_a_damaged_or_misplaced_embedder_entry_is_rebuilt(tmp_path, monkeypatch):
    from align_env import models

    pytest.importorskip("all_minilm_l6_v2", reason="the packaged embedder is not installed")
    monkeypatch.setenv("ALIGN_ENV_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "minilm-l6"
    target.parent.mkdir(parents=True)
    target.write_text("a file where the entry's folder should be")
    assert models.prepare_embedder("minilm-l6") == target and models.cache_entry_ok(target)
    digest = models.manifest_digest(target)
    damage(target / "config.json", "flip")
    assert not models.cache_entry_ok(target)
    models.prepare_embedder("minilm-l6")
    assert models.cache_entry_ok(target) and models.manifest_digest(target) == digest  # rebuilt as it was
    assert json.loads((target / "config.json").read_text())  # the config is whole again


# -- the judgement cache ----------------------------------------------------------------------------------------
def _filled_store(path: Path, n: int = 3000) -> dict[str, float]:
    from align_env.feedback.cache import JudgementStore

    rows = {f"{k:064x}": (k % 997) / 996 for k in range(n)}
    JudgementStore(path).put_many(rows)
    return rows


@pytest.mark.parametrize("how", DAMAGES)
def test_a_corrupt_judgement_cache_is_set_aside_and_never_serves_a_wrong_value(tmp_path, how):
    from align_env.feedback.cache import JudgementStore

    path = tmp_path / "judgements.sqlite"
    rows = _filled_store(path)
    damage(path, how)
    with __import__("warnings").catch_warnings(record=True) as caught:
        __import__("warnings").simplefilter("always")
        store = JudgementStore(path)
        got = store.get_many(list(rows), "pairwise")
    assert all(got[k] == rows[k] for k in got)  # whatever survived is exactly what was stored
    if how != "flip":  # a flipped byte may fall in one row (then only that row is a miss) or in the structure
        assert store.set_aside and store.set_aside[0].name == "judgements.sqlite.corrupt-1"
        assert any("set it aside as judgements.sqlite.corrupt-1" in str(w.message) for w in caught)
        assert got == {}
    else:
        assert store.set_aside or len(got) < len(rows)
    store.put_many({"k": 0.25})  # usable afterwards
    assert JudgementStore(path).get_many(["k"], "pairwise") == {"k": 0.25}


def test_a_foreign_sqlite_file_or_old_schema_is_set_aside(tmp_path):
    import sqlite3

    from align_env.feedback.cache import JudgementStore

    for name, sql in (("foreign.sqlite", "CREATE TABLE users (id INTEGER, email TEXT)"),
                      ("old.sqlite", "CREATE TABLE judgements (key TEXT PRIMARY KEY, verdict REAL NOT NULL)")):
        path = tmp_path / name
        with sqlite3.connect(path) as db:
            db.execute(sql)
        with pytest.warns(RuntimeWarning, match=r"belongs to another program|has columns"):
            store = JudgementStore(path)
        assert store.set_aside[0].exists() and store.get_many(["x"]) == {}
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.warns(RuntimeWarning, match="it is a folder"):
        JudgementStore(tmp_path / "dir.sqlite")


def test_cached_values_that_are_not_verdicts_are_discarded_and_judged_again(tmp_path):
    import sqlite3

    from align_env.feedback import make_annotator
    from align_env.feedback.cache import judgement_key, row_tag

    path = tmp_path / "j.sqlite"
    prompts, a, b = ["Summarize: cats sleep a lot."] * 4, ["Cats sleep.", "x", "", "Cats nap"], ["dogs", "y y", "z", ""]
    truth = make_annotator("rules?cache=off", track="summarize").pairwise(prompts, a, b)
    judge = make_annotator(f"rules?cache={path}", track="summarize")
    keys = [judgement_key(judge.spec, "pairwise", p, x, y) for p, x, y in zip(prompts, a, b)]
    with sqlite3.connect(path) as db:  # rows with valid tags but values that are no probabilities
        db.executemany("INSERT INTO judgements VALUES (?, ?, ?)",
                       [(k, v, row_tag(k, v)) for k, v in zip(keys, [1.7, -0.2, float("inf"), 0.5])])
    got = judge.pairwise(prompts, a, b)
    assert judge.hits == 1 and got[:3] == truth[:3] and got[3] == 0.5  # the one usable row is served
    with sqlite3.connect(path) as db:
        stored = dict(db.execute("SELECT key, verdict FROM judgements"))
    assert [stored[k] for k in keys[:3]] == truth[:3]  # the bad rows were replaced by real verdicts


def test_replacing_the_weights_behind_a_path_does_not_serve_old_verdicts(tiny_lm_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from align_env.feedback import make_annotator

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    spec = f"{model}:likelihood?cache={tmp_path / 'j.sqlite'}"
    prompts, resp = ["Summarize: the cat sat on the mat."], ["A cat sat."]
    first = make_annotator(spec, track="summarize")
    before = first.score(prompts, resp)
    again = make_annotator(spec, track="summarize")
    assert again.score(prompts, resp) == before and again.hits == 1  # same weights: served from the cache
    tensors = load_file(model / "model.safetensors")
    torch.manual_seed(1)
    save_file({k: torch.randn_like(v) for k, v in tensors.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    from align_env.engines import _LOADED

    _LOADED.clear()  # a new process would load the new weights
    replaced = make_annotator(spec, track="summarize")
    after = replaced.score(prompts, resp)
    assert replaced.hits == 0 and after != before
