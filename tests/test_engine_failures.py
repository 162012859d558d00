"""The ``openai`` engine against real loopback servers that misbehave: down, slow, garbage, errors.

Every server here is a real ``ThreadingHTTPServer`` on 127.0.0.1 scripted per test; every test has a hard
timeout, and asserts that the engine ends (with a result or a clear error) well within its own bounds.
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align_env.engines.openai_engine import OpenAIEngine, ServerError, parse_label
from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator

pytest.importorskip("requests", reason="the openai engine needs requests")
pytestmark = pytest.mark.timeout(30)

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Which is better? Answer A or B."}]
SECRET = "sk-test-SECRET-4242"


# -- a scriptable server ---------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        size = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(size) or b"{}")
        srv = self.server
        with srv.lock:
            srv.seen.append((self.path, dict(self.headers), body))
            queue = srv.routes.get(self.path)
            responder = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else reply({"error": "no route"}, 404)
        try:
            responder(self, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first: expected in timeout tests
            pass

    def send(self, status: int, data: bytes, headers=()) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def reply(obj, status: int = 200, headers=()):
    """Answer with ``obj`` (bytes as they are; a callable gets (handler, body) and returns what to send)."""

    def respond(h, body):
        got = obj(h, body) if callable(obj) else obj
        h.send(status, got if isinstance(got, bytes) else json.dumps(got).encode(), headers)

    return respond


def stall(seconds: float):
    """Answer nothing for ``seconds`` (or until the server closes), then a valid answer."""

    def respond(h, body):
        h.server.closing.wait(seconds)
        reply(chat_answer())(h, body)

    return respond


def drip(seconds: float):
    """Send headers promptly, then the body one byte every 0.1 s (never a whole answer within ``seconds``)."""

    def respond(h, body):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not h.server.closing.is_set():
            h.wfile.write(b" ")
            h.wfile.flush()
            h.server.closing.wait(0.1)

    return respond


def chat_answer(a: float = -0.3, b: float = -1.5, text: str = "A", logprobs: bool = True) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
    if logprobs:
        tops = [{"token": "A", "logprob": a}, {"token": "B", "logprob": b}]
        choice["logprobs"] = {"content": [{"token": text, "logprob": max(a, b), "top_logprobs": tops}]}
    return {"choices": [choice], "usage": {"prompt_tokens": 12, "completion_tokens": 1}}


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.block_on_close = True, False
    srv.routes, srv.seen, srv.lock, srv.closing = {}, [], threading.Lock(), threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.closing.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def engine(srv_url: str, **kw) -> OpenAIEngine:
    options = {"timeout": 2.0, "max_retries": 2, "backoff": 0.01, "backoff_max": 0.05} | kw
    return OpenAIEngine("judge-model", base_url=srv_url, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the tests ---------------------------------------------------------------------------------------------------
def test_a_well_behaved_server_gives_label_logprobs(server):
    server.routes[CHAT] = [reply(chat_answer(-0.3, -1.5))]
    eng = engine(server.url)
    (row,) = eng.next_token_logprobs([MSG], [" A", " B"])
    assert row == {" A": pytest.approx(-0.3), " B": pytest.approx(-1.5)}
    path, headers, body = server.seen[0]
    assert path == CHAT and body["model"] == "judge-model" and body["max_tokens"] == 1 and body["logprobs"] is True
    assert "Authorization" not in headers  # no key in the environment: none sent
    assert eng.usage == {"tokens_in": 12, "tokens_out": 1}


def test_server_down_is_a_clear_error_naming_the_url_after_bounded_retries(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    port = free_port()
    eng = engine(f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ServerError) as info:
        eng.next_token_logprobs([MSG], ["A", "B"])
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message
    assert "connection refused" in message and "gave up after 3 attempts" in message
    assert eng.stats["requests"] == 3 and eng.stats["retries"] == 2
    assert time.monotonic() - start < 3
    # The annotator built on it fails at once, with the same clear error (its capability probe).
    spec = f"down:llm_judge?engine=openai&base_url=http://127.0.0.1:{port}&max_retries=1&backoff=0.01&cache=off"
    with pytest.raises(AlignEnvError, match=f"127.0.0.1:{port}.*connection refused"):
        make_annotator(spec)


def test_a_slow_server_times_out_within_bounds(server):
    server.routes[CHAT] = [stall(20)]
    eng = engine(server.url, timeout=0.5, max_retries=1)
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"did not answer within 0\.5 s.*gave up after 2 attempts"):
        eng.next_token_logprobs([MSG], ["A", "B"])
    assert time.monotonic() - start < 3 and len(server.seen) == 2


def test_a_server_that_drips_its_body_cannot_hold_the_call(server):
    server.routes[CHAT] = [drip(20)]
    eng = engine(server.url, timeout=0.5, max_retries=0)
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"within 0\.5 s"):
        eng.generate([MSG], max_new_tokens=4)
    assert time.monotonic() - start < 3


def test_garbage_and_missing_fields_are_clear_errors_without_retry(server):
    server.routes[CHAT] = [reply(b"<html>502 Bad Gateway</html>")]
    eng = engine(server.url)
    with pytest.raises(ServerError, match="not JSON.*502 Bad Gateway"):
        eng.next_token_logprobs([MSG], ["A", "B"])
    assert len(server.seen) == 1  # a 200 with garbage is not retried
    server.routes[CHAT] = [reply({"id": "x", "object": "chat.completion"})]
    with pytest.raises(ServerError, match="without choices"):
        eng.generate([MSG])
    server.routes[CHAT] = [reply({"error": {"message": "model overloaded"}})]
    with pytest.raises(ServerError, match="without a result.*model overloaded"):
        eng.generate([MSG])
    bad_lp = chat_answer()
    bad_lp["choices"][0]["logprobs"] = {"content": [{"token": "A", "logprob": "high", "top_logprobs": 7}]}
    server.routes[CHAT] = [reply(bad_lp)]
    with pytest.raises(ServerError, match="malformed log-probs"):
        eng.next_token_logprobs([MSG], ["A", "B"])


def _judge_by_text(answer):
    """A server without log-probs whose judge answers in text; ``answer(content)`` picks the text."""

    def respond(h, body):
        content = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        data = chat_answer(text=answer(content), logprobs=False)
        data["choices"][0]["finish_reason"] = "stop"
        return data

    return reply(respond)


def test_without_logprobs_the_judge_parses_text_and_abstains_when_it_cannot(server):
    def prefers_good(content):  # names the position of the response that says GOOD
        return "Response A" if content.index("GOOD") < content.index("BAD") else "B."

    server.routes[CHAT] = [_judge_by_text(prefers_good)]
    server.routes["/v1/completions"] = [reply({"error": {"message": "echo is not supported"}}, 400)]
    judge = make_annotator(f"m:llm_judge?engine=openai&base_url={server.url}&backoff=0.01&cache=off")
    assert judge.pairwise(["q1", "q2"], ["GOOD one", "BAD one"], ["BAD two", "GOOD two"]) == [1.0, 0.0]
    eng = judge.engine
    assert "parsed from generated text" in eng.capability_notes["next_token"]
    assert eng.stats["parsed_answers"] == 4 and eng.stats["unparsed_answers"] == 0
    asked = [b for p, _, b in server.seen if p == CHAT]
    assert asked[0]["max_tokens"] == 1 and asked[-1]["max_tokens"] == eng.answer_tokens  # then text only
    # An answer naming no label: the judge abstains, and the engine counts it.
    server.routes[CHAT] = [_judge_by_text(lambda content: "Both responses have merit.")]
    assert judge.pairwise(["q3"], ["GOOD"], ["BAD"]) == [None]
    assert [(d["p_ab"], d["p_ba"]) for d in judge.last_details] == [(None, None)]
    assert eng.stats["unparsed_answers"] == 2
    # The likelihood family needs prompt log-probs this server does not give: a clear error at build time.
    with pytest.raises(AlignEnvError, match=r"likelihood.*needs 'score'.*echo is not supported"):
        make_annotator(f"m:likelihood?engine=openai&base_url={server.url}&backoff=0.01&cache=off")


def test_server_errors_are_retried_until_success(server):
    server.routes[CHAT] = [reply({"error": {"message": "boom"}}, 500), reply("busy", 429, [("Retry-After", "0.05")]),
                           reply({"error": "bad gateway"}, 502), reply(chat_answer(-0.1, -2.5))]
    eng = engine(server.url, max_retries=3)
    (row,) = eng.next_token_logprobs([MSG], ["A", "B"])
    assert row["A"] == pytest.approx(-0.1) and len(server.seen) == 4
    assert eng.stats["retries"] == 3 and eng.stats["failures"] == 0
    server.routes[CHAT] = [reply({"error": {"message": "still broken"}}, 503)]
    with pytest.raises(ServerError, match=r"HTTP 503: still broken.*gave up after 3 attempts") as info:
        engine(server.url).generate([MSG])
    assert info.value.status == 503 and info.value.retryable


def test_bad_key_is_not_retried_and_never_shown(server, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_KEY", SECRET)

    def refuse(h, body):  # the way some servers do it: the offending header echoed back
        return {"error": {"message": f"invalid api key: {h.headers['Authorization']}", "code": 401}}

    server.routes[CHAT] = server.routes["/v1/completions"] = [reply(refuse, 401)]
    eng = engine(server.url, api_key_env="ALIGN_TEST_KEY", max_retries=3)
    with pytest.raises(ServerError) as info:
        eng.generate([MSG])
    message = str(info.value)
    assert "HTTP 401" in message and "$ALIGN_TEST_KEY" in message and "SECRET" not in message
    assert len(server.seen) == 1 and server.seen[0][1]["Authorization"] == f"Bearer {SECRET}"
    assert "SECRET" not in repr(eng) and "SECRET" not in repr(vars(eng))
    assert b"SECRET" not in pickle.dumps(eng)
    with pytest.raises(AlignEnvError, match="environment"):
        OpenAIEngine.from_name("m", api_key=SECRET)
    # An annotator over it fails at build time, with the key hidden as well.
    spec = f"m:llm_judge?engine=openai&base_url={server.url}&api_key_env=ALIGN_TEST_KEY&cache=off"
    with pytest.raises(ServerError, match="HTTP 401") as info:
        make_annotator(spec)
    assert "SECRET" not in str(info.value)


def test_an_overlong_prompt_refused_by_the_server_is_a_prompt_error(server):
    from align_env.engines.transformers_engine import PromptTooLongError

    message = "This model's maximum context length is 2048 tokens, however you requested 5000 tokens"
    server.routes[CHAT] = [reply({"error": {"message": message}}, 400)]
    with pytest.raises(PromptTooLongError, match="maximum context length"):
        engine(server.url).generate([MSG])
    assert len(server.seen) == 1


def test_parse_label():
    labels = [" A", " B"]
    assert parse_label("B", labels) == " B" and parse_label("(A) because it is kind", labels) == " A"
    assert parse_label("**B**", labels) == " B" and parse_label("I prefer Response B.", labels) == " B"
    assert parse_label("A good answer would be longer", labels) is None  # the article, not a label
    assert parse_label("", labels) is None and parse_label("neither", labels) is None
    assert parse_label("3/5", [str(d) for d in range(6)]) == "3"
