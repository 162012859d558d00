"""The ``openai`` engine against a real OpenAI-compatible server: llama-cpp-python's, serving the SmolLM2 GGUF.

The fixture starts ``python -m llama_cpp.server`` on a free loopback port, waits (bounded) until it answers,
and stops it at the end of the module. The same judge on the same GGUF in-process (``llama_cpp`` engine) is
the reference: over HTTP it must give the same verdicts.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from align_env.errors import AlignEnvError

try:  # the package's own imports need the `llm` CLI, which the README installs without: look for the file
    from align_env.models import gguf_path

    gguf_path("smollm2-135m")
except AlignEnvError as exc:
    pytest.skip(f"the smollm2 GGUF is not available: {exc}", allow_module_level=True)
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
_missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(f"llama.cpp's OpenAI-compatible server needs {', '.join(_missing)}: "
                f"pip install 'llama-cpp-python[server]' (or align-env[llama])", allow_module_level=True)

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(240)]

MSG = [{"role": "user", "content": "Which is a fruit? A: apple B: car. Answer with a single letter."}]
READY_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from align_env.models import gguf_path

    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path("smollm2-135m")), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--model_alias", "smollm2", "--verbose", "false"]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "API_KEY")}
    url = f"http://127.0.0.1:{port}/v1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with code {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                with opener.open(url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server was not ready within {READY_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def remote(server_url):
    from align_env.engines.openai_engine import OpenAIEngine

    return OpenAIEngine("smollm2", base_url=server_url, timeout=60, max_retries=1)


@pytest.fixture(scope="module")
def local():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from align_env.engines import make_engine

    return make_engine("llama_cpp", "smollm2-135m", n_ctx=1024, n_threads=1)


def test_capabilities_generation_and_usage(remote):
    from align_env.engines import Engine

    assert isinstance(remote, Engine)
    # llama-cpp-python's server echoes prompt log-probs shifted by a token: the probe finds out.
    assert remote.capabilities == {"generate", "next_token"}
    assert "misaligned" in remote.capability_notes["score"]
    (chat,), (plain,) = remote.generate([MSG, "The capital of France is"], temperature=0, max_new_tokens=4)
    assert chat.text.startswith("A") and 0 < chat.tokens <= 4 and chat.prompt_tokens > 30
    assert plain.text and plain.finish_reason in ("stop", "length")
    assert remote.generate([MSG], temperature=0, max_new_tokens=4)[0][0].text == chat.text  # greedy repeats
    assert remote.usage["tokens_in"] > 30 and remote.usage["tokens_out"] > 0


def test_next_token_logprobs_match_the_in_process_engine(remote, local):
    other = [{"role": "user", "content": "Is the sky green? Answer A for yes or B for no."}]
    got = remote.next_token_logprobs([MSG, other, MSG], ["A", "B"])
    ref = local.next_token_logprobs([MSG, other], ["A", "B"])
    # The thread pool keeps the order: got[1] must match the other prompt's reference (checked below), and the
    # repeated prompt its first answer. The server caches the prompt, so the repeat evaluates only its last token,
    # alone; llama.cpp's CPU kernels can differ between 1-token and many-token evaluations by up to 0.07 nats.
    assert got[2]["A"] == pytest.approx(got[0]["A"], abs=0.1) and got[2]["B"] == pytest.approx(got[0]["B"], abs=0.1)
    for g, r in zip(got, ref):
        assert all(math.isfinite(v) and v < 0 for v in g.values())
        assert g["A"] == pytest.approx(r["A"], abs=0.1) and g["B"] == pytest.approx(r["B"], abs=0.1)  # see above
    assert got[0]["A"] > got[0]["B"]
    assert max(abs(got[1][k] - got[0][k]) for k in "AB") > 0.2  # the two prompts are told apart


def _short_pairs(k: int = 2):
    from align_env.tracks import get_track

    pairs = sorted(get_track("helpful").pairs, key=lambda p: len(p.item.prompt) + len(p.chosen) + len(p.rejected))
    return [p.item for p in pairs[:k]], [p.chosen for p in pairs[:k]], [p.rejected for p in pairs[:k]]


def test_llm_judge_over_http_agrees_with_the_in_process_judge(server_url, local):
    from align_env.feedback import make_annotator

    items, chosen, rejected = _short_pairs()
    over_http = make_annotator(f"smollm2:llm_judge?engine=openai&base_url={server_url}&timeout=60&cache=off",
                               track="helpful")
    in_process = make_annotator("smollm2-135m:llm_judge?engine=llama_cpp&n_ctx=1024&n_threads=1&cache=off",
                                track="helpful")
    start = time.perf_counter()
    remote = over_http.pairwise(items, chosen, rejected)
    seconds = time.perf_counter() - start
    ref = in_process.pairwise(items, chosen, rejected)
    print(f"\nopenai engine (llama.cpp server, 1 thread): {seconds / len(items):.2f} s per pair judged in both orders")
    assert all(p is not None and 0.0 <= p <= 1.0 and math.isfinite(p) for p in remote)
    for p, r in zip(remote, ref):
        assert (p - 0.5) * (r - 0.5) > 0 or abs(p - r) < 0.02  # the same direction (or both at a tie)
        assert p == pytest.approx(r, abs=0.02)
    # Swapping the responses mirrors the verdict (both orders are judged and averaged).
    swapped = over_http.pairwise(items[:1], rejected[:1], chosen[:1])
    assert swapped[0] == pytest.approx(1.0 - remote[0], abs=1e-6)


def test_likelihood_on_this_server_is_a_clear_error(server_url, remote):
    from align_env.engines.openai_engine import CapabilityError
    from align_env.feedback import make_annotator

    with pytest.raises(AlignEnvError, match=r"'likelihood' needs 'score' but engine 'openai'.*misaligned"):
        make_annotator(f"smollm2:likelihood?engine=openai&base_url={server_url}&cache=off")
    with pytest.raises(CapabilityError, match=r"cannot serve 'score'.*\(transformers, llama_cpp\)"):
        remote.score([MSG], ["A"])
