"""Secrets never appear in output: a real loopback server that echoes the request's headers back, in every
way a server can quote them (an error body, a 200 without choices, a non-JSON body, a 5xx retried, a
malformed ``usage``), and every error message, log line, captured stdout/stderr, stored note and pickle is
searched for the key.
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align_env.engines.openai_engine import OpenAIEngine, ServerError
from align_env.engines.openai_parse import shape, usage_counts
from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator
from align_env.redaction import MASK, neutralize, redact, safe_text

pytest.importorskip("requests", reason="the openai engine needs requests")
pytestmark = pytest.mark.timeout(60)

KEY = "k3yPLAIN0123456789xyz"  # no 'sk-' prefix: only the value itself can find it
MSG = [{"role": "user", "content": "Which is better? Answer A or B."}]


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = dict(self.headers)
        mode = self.server.mode
        raw_headers = str(self.headers)  # "Authorization: Bearer ...\r\nHost: ..." as received
        if mode == "401":
            status, body = 401, json.dumps({"error": {"message": f"bad key in {headers}"}}).encode()
        elif mode == "no_choices":
            status, body = 200, json.dumps({"object": "echo", "headers": headers}).encode()
        elif mode == "error_200":
            status, body = 200, json.dumps({"error": {"message": raw_headers}}).encode()
        elif mode == "not_json":
            status, body = 200, f"<html>{raw_headers}</html>".encode()
        elif mode == "500":
            status, body = 500, f"upstream failed for {raw_headers}".encode()
        elif mode == "bad_usage":
            choice = {"message": {"content": "A"}, "finish_reason": "stop"}
            status, body = 200, json.dumps({"choices": [choice], "usage": {"prompt_tokens": headers.get(
                "Authorization"), "completion_tokens": -3}}).encode()
        else:
            raise AssertionError(mode)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def echo_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads, srv.block_on_close, srv.mode = True, False, "401"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


MODES = ["401", "no_choices", "error_200", "not_json", "500", "bad_usage"]


def test_no_reply_of_an_echoing_server_shows_the_key(echo_server, monkeypatch, capsys, caplog):
    monkeypatch.setenv("ALIGN_REDACTION_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{echo_server.server_address[1]}"
    messages = []
    for mode in MODES:
        echo_server.mode = mode
        eng = OpenAIEngine("m", base_url=url, api_key_env="ALIGN_REDACTION_TEST_KEY", max_retries=1, backoff=0.01,
                           backoff_max=0.02, timeout=5, capabilities=["generate", "next_token"])
        for call in (lambda: eng.generate([MSG], max_new_tokens=2), lambda: eng.next_token_logprobs([MSG], ["A"])):
            with pytest.raises(ServerError) as info:
                call()
            messages.append(f"{mode}: {info.value}")
            messages.append(repr(info.value.args))
        messages += [repr(eng), repr(vars(eng)), json.dumps(eng.capability_notes), json.dumps(eng.stats)]
        assert KEY.encode() not in pickle.dumps(eng)
    # The annotator built on the engine: its build-time probe meets the same server.
    echo_server.mode = "no_choices"
    with pytest.raises(AlignEnvError) as info:
        make_annotator(f"m:likelihood?engine=openai&base_url={url}&api_key_env=ALIGN_REDACTION_TEST_KEY"
                       f"&max_retries=0&cache=off")
    messages.append(str(info.value))
    out = capsys.readouterr()
    everything = "\n".join(messages + [out.out, out.err, caplog.text])
    assert KEY not in everything and KEY[:12] not in everything
    # ...and the errors still say what happened, with the shape of the reply where it was malformed.
    text = "\n".join(messages)
    assert "HTTP 401" in text and "$ALIGN_REDACTION_TEST_KEY" in text
    assert "without choices (reply shape: {object: str, headers: {" in text
    assert "not JSON" in text and "HTTP 500" in text and "gave up after 2 attempts" in text
    assert "malformed 'usage'" in text and "prompt_tokens: str, completion_tokens: negative number" in text


def test_a_key_given_in_memory_is_masked_too(echo_server, capsys):
    url = f"http://127.0.0.1:{echo_server.server_address[1]}"
    echo_server.mode = "error_200"
    secret = "inMemoryOnly-987654321"
    eng = OpenAIEngine("m", base_url=url, api_key=secret, max_retries=0, capabilities=["generate"])
    with pytest.raises(ServerError, match="without a result") as info:
        eng.generate([MSG])
    assert secret not in str(info.value) and MASK in str(info.value)


@pytest.mark.parametrize("text", [
    "Authorization: Bearer abc.def-123", '{"Authorization": "Basic dXNlcjpwYXNz"}', "{'x-api-key': 'zzz-top'}",
    "api_key=hunter2hunter2&model=m", "proxy-authorization: Digest qop=auth", "curl -H 'Authorization: Bearer tok123'",
    "use sk-proj-abcdefghijklmnop now", "token hf_abcdefghijklmnopqrst", "cookie: session=deadbeef",
])
def test_redact_masks_credential_shapes(text):
    out = redact(text)
    assert MASK in out
    for secret in ("abc.def-123", "dXNlcjpwYXNz", "zzz-top", "hunter2hunter2", "qop=auth", "tok123",
                   "sk-proj-abcdefghijklmnop", "hf_abcdefghijklmnopqrst", "deadbeef"):
        assert secret not in out


def test_redact_leaves_ordinary_text_alone():
    for text in ("the token limit was exceeded", "a basic answer", "maximum context length is 2048 tokens",
                 "HTTP 404: model not found"):
        assert redact(text) == text


def test_neutralize_escapes_terminal_control():
    evil = "ok\x1b[2J\x1b]0;title\x07\x1b[31mred\x00\x08\u202e\ud800 end\nnext\tcol"
    out = neutralize(evil)
    assert not any(c in out for c in "\x1b\x07\x00\x08\u202e\ud800")
    assert out.startswith("ok\\x1b[2J") and out.endswith(" end\nnext\tcol")  # newline and tab kept
    assert out.encode("utf-8")  # printable on any UTF-8 terminal
    assert safe_text("x" * 50, 10) == "x" * 10 + "..."


def test_usage_parser_names_the_shape():
    assert usage_counts({"usage": {"prompt_tokens": 3, "completion_tokens": 2.0}}, "u") == (3, 2)
    assert usage_counts({}, "u") is None and usage_counts({"usage": {}}, "u") == (0, 0)
    for bad in ({"prompt_tokens": "12"}, {"completion_tokens": -1}, {"prompt_tokens": 1.5}, [1, 2],
                {"prompt_tokens": float("inf")}, {"prompt_tokens": True}):
        with pytest.raises(ServerError, match=r"malformed 'usage'.*reply shape: \{usage: "):
            usage_counts({"usage": bad}, "u")
    assert shape({"a": [1, 2], "b": {"c": None}, "d": -1}) == "{a: list[2] of int, b: {c: null}, d: negative number}"
