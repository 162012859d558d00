"""Seeded fuzzing of every input boundary: each generated bad input either works or raises AlignEnvError
(or a documented subclass) whose message names the problem; no other exception escapes.

Drives the spec parser, ``spaces.check_response``/``check_pair``, ``AlignEnv``, ``AlignVectorEnv`` and the
annotator families on tiny random models whose context is small (64 tokens), so overlong texts are truncated.
Plain ``random.Random(seed)`` generators; the number of cases is in the test ids and asserted.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time

import numpy as np
import pytest

from align_env import AlignEnv, AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator, parse_spec
from align_env.spaces import check_pair, check_response
from align_env.tracks import PromptItem

SEED = int(os.environ.get("ALIGN_ENV_FUZZ_SEED", "20261203"))  # another seed explores further
CASES = {"spec": 400, "spaces": 300, "env": 150, "vector_env": 150, "annotators": 30}  # annotators: per family
ITEM = PromptItem(id="x", prompt="How do I boil an egg?", source="How do I boil an egg?",
                  reference="Put it in boiling water for seven minutes.")


# -- generators -------------------------------------------------------------------------------------------------
VALID = ["", " \n\t ", "a plain answer", "🙂 ünïcödé 漢字 ‮rtl‬ \u200b", "\x00nul\x00", "\x07\x1b[31m\x7f",
         np.str_("numpy string"), "Put it in boiling water for seven minutes.", "\u0301\u0301 combining"]
INVALID = ["\ud800", "ok \udfff tail", b"bytes", None, 0, 3.5, float("nan"), True, ["a"], ("a", "b"), {"a": 1},
           np.array(["a"])]


def texts(rng: random.Random, long: bool = True, bad: float = 0.4):
    """A value meant as a text: valid strings of every Unicode class (and long ones), or a non-text."""
    value = rng.choice(INVALID if rng.random() < bad else VALID)
    if long and rng.random() < 0.08:
        n = rng.choice([300, 5_000, 100_001, 1_000_001])
        value = ("word " * (n // 5 + 1))[:n]
        if rng.random() < 0.3:  # a lone surrogate deep inside a long text
            k = rng.randrange(n)
            value = value[:k] + "\udbff" + value[k + 1:]
    return value


NUMBERS = ["nan", "inf", "-inf", "-0", "0", "1", "-3", "1e400", "99999999999999999999999", "0.49", "0.5", "true",
           "false", "", "abc", "%00", "%ED%A0%80", "2.5", "1e-300", "%F0%9F%99%82", "none", "memory"]
KEYS = ["temperature", "mode", "calibrate", "samples", "k", "seed", "noise", "combine", "both_orders", "suffix",
        "max_new_tokens", "pointwise", "length_penalty", "prefer", "oracle", "batch_size", "max_length", "engine",
        "dtype", "timeout", "api", "cache", "", "bad key", "ключ", "%00", "x\ud800"]
HEADS = ["rules", "pool?members=rules", "{lm}:likelihood", "{lm}:llm_judge", "{lm}:embedding", "self", "",
         ":rules", "m:", "rulez", "ru\u0000les", "ru\ud800les", "🙂:llm_judge", "{lm}:reward_model", "a:b:rules",
         " rules ", "rules\n"]


def spec_string(rng: random.Random, lm: str) -> str:
    head = rng.choice(HEADS).format(lm=lm)
    parts = [f"{rng.choice(KEYS)}={rng.choice(NUMBERS)}" for _ in range(rng.randrange(0, 3))]
    if parts and rng.random() < 0.1:
        parts.append(parts[0])  # a repeated key
    if rng.random() < 0.05:
        parts.append("novalue")
    sep = "&" if "?" in head else "?"
    return head + (sep + "&".join(parts) if parts else "")


def pair_action(rng: random.Random):
    shape = rng.randrange(6)
    if shape == 0:
        return texts(rng)
    if shape == 1:
        return tuple(texts(rng) for _ in range(rng.choice([0, 1, 3])))
    if shape == 2:
        return np.array([str(texts(rng, long=False)), "b"])
    return (texts(rng), texts(rng)) if shape < 5 else [texts(rng), texts(rng)]


def vector_action(rng: random.Random, n: int, feedback: str):
    def column():
        m = rng.choice([n, n, n - 1, n + 1, 0])
        pick = rng.randrange(4)
        col = [texts(rng, long=False) if rng.random() < 0.4 else "fine" for _ in range(max(0, m))]
        return col if pick else (np.array(["x"] * max(0, m)) if pick == 0 else tuple(col))

    if feedback == "scalar":
        return rng.choice([column(), column(), "one string", None, 7, np.array([["a"] * n])])
    shape = rng.randrange(7)
    return [(column(), column()), [column(), column()], ("a", "b"), [("a", "b")] * n, None,
            np.array([["a"] * n, ["b"] * n]), (column(),)][shape]


# -- checks --------------------------------------------------------------------------------------------------------
def outcome(call, *names: str) -> str:
    """Run ``call``; "ok", or "error" when it raised an AlignEnvError whose message names one of ``names``."""
    try:
        call()
    except AlignEnvError as exc:
        msg = str(exc).lower()
        assert msg and any(n.lower() in msg for n in names), f"error names none of {names}: {msg[:300]}"
        return "error"
    return "ok"


def valid_verdicts(verdicts, n: int, kind: str) -> None:
    assert len(verdicts) == n
    for v in verdicts:
        assert v is None or (isinstance(v, float) and math.isfinite(v)), v
        assert v is None or kind != "pairwise" or 0.0 <= v <= 1.0, v


TEXT_WORDS = ("response", "prompt", "str", "surrogate", "characters", "batch", "pair", "action", "texts")


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_lm(tiny_lm_dir, tmp_path_factory):
    """The tiny Llama with a 64-token context: every long text must be truncated by policy."""
    path = tmp_path_factory.mktemp("short-llama")
    shutil.copytree(tiny_lm_dir, path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 64
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return str(path)


@pytest.fixture(scope="module")
def tiny_heads(tiny_lm_dir, tmp_path_factory):
    """A tiny reward model (Llama, 64 positions) and a tiny BERT encoder (32 absolute positions)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    rm, bert = tmp_path_factory.mktemp("rm"), tmp_path_factory.mktemp("bert")
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    ).save_pretrained(rm)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id)
              ).save_pretrained(bert)
    for d in (rm, bert):
        tok.save_pretrained(d)
    return str(rm), str(bert)


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [CASES["spec"]], ids=lambda n: f"{n}-cases")
def test_fuzz_spec_parser(n, short_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cache=<path> values write there, never into the checkout
    rng, seen = random.Random(SEED), {"ok": 0, "error": 0}
    for _ in range(n):
        spec = spec_string(rng, short_lm)
        names = ["spec", "parameter", "family", "model", "engine", "pool", "annotator", "cache"]
        seen[outcome(lambda: make_annotator(spec, track="helpful"), *names)] += 1
    assert seen["ok"] > 0 and seen["error"] > n // 2, seen


@pytest.mark.parametrize("value, msg", [
    ("smollm2-135m:llm_judge?calibrate=bogus", "'calibrate' got 'bogus'; accepted: one of ['none', 'content_free']"),
    ("smollm2-135m:llm_judge?temperature=abc", "'temperature' got 'abc'"),
    ("rules?temperature=nan", "'temperature' got nan"), ("rules?oracle=2", "'oracle' got 2; accepted: true or false"),
    ("pool?members=rules&noise=0.5", "'noise' got 0.5"), ("smollm2-135m:llm_judge?k=-3", "no parameter 'k'"),
    ("rules?seed=1&seed=2", "'seed' is given twice"), ("rules?=1", "parameter name '' is empty"),
    ("ru\ud800les", "U+D800"), ("rules?prefer=%00", "U+0000"), ("smollm2-135m:llm_judge?samples=1.5", "'samples'"),
    ("m:llm_judge?engine=openai&timeout=-0", "'timeout' got 0; accepted: a finite number with 0.0 < x"), ("🙂:bad family!", "is not a name"),
])
def test_spec_errors_name_parameter_value_and_accepted(value, msg):
    with pytest.raises(AlignEnvError) as info:
        make_annotator(value, track="helpful")
    assert msg in str(info.value)


def test_typed_values_are_converted():
    ann = make_annotator("rules?temperature=1&length_penalty=0&oracle=1", track="harmless")
    assert ann.temperature == 1.0 and ann.length_penalty == 0.0 and ann.oracle is True
    assert parse_spec("rules?suffix=a+b").params == {"suffix": "a b"}
    judge = make_annotator("self?suffix=007&temperature=0", track="helpful")  # strings stay as written
    assert judge.suffix == "007" and judge.temperature == 0.0


@pytest.mark.parametrize("n", [CASES["spaces"]], ids=lambda n: f"{n}-cases")
def test_fuzz_spaces(n):
    rng, seen = random.Random(SEED + 1), {"ok": 0, "error": 0}
    for _ in range(n):
        value, action = texts(rng), pair_action(rng)
        seen[outcome(lambda: check_response(value), *TEXT_WORDS)] += 1
        seen[outcome(lambda: check_pair(action), *TEXT_WORDS)] += 1
    assert seen["ok"] > 0 and seen["error"] > 0


def test_text_policy():
    assert check_response(np.str_("x")) == "x" and type(check_response(np.str_("x"))) is str
    assert check_response("") == "" and check_response("\x00") == "\x00"  # empty and NUL are valid text
    with pytest.raises(AlignEnvError, match="lone surrogate '\\\\ud800' at character 3"):
        check_response("abc\ud800")
    with pytest.raises(TypeError, match="response must be str, got NoneType"):  # TextTypeError is both
        check_response(None)


@pytest.mark.parametrize("n", [CASES["env"]], ids=lambda n: f"{n}-cases")
def test_fuzz_env(n):
    rng, seen = random.Random(SEED + 2), {"ok": 0, "error": 0}
    envs = {f: AlignEnv(track="helpful", feedback=f) for f in ("pairwise", "scalar")}
    for k in range(n):
        feedback = "pairwise" if k % 2 else "scalar"
        env = envs[feedback]
        options = rng.choice([None, {}, {"prompt_id": 3}, {"prompt_id": "nope"}, "opts", {"other": 1}])
        if outcome(lambda: env.reset(seed=k, options=options), "options", "prompt", "prompt_id") == "error":
            env.reset(seed=k)
        action = pair_action(rng) if feedback == "pairwise" else texts(rng)

        def step():
            _, reward, *_ , info = env.step(action)
            assert math.isfinite(reward)

        seen[outcome(step, *TEXT_WORDS)] += 1
    for kwargs in ({"feedback": 3}, {"track": None}, {"feedback": "pairwize"}, {"render_mode": 1}, {"split": 0}):
        outcome(lambda: AlignEnv(**kwargs), "feedback", "track", "render", "split")
    assert seen["ok"] > 0 and seen["error"] > 0, seen


@pytest.mark.parametrize("n", [CASES["vector_env"]], ids=lambda n: f"{n}-cases")
def test_fuzz_vector_env(n):
    rng, seen = random.Random(SEED + 3), {"ok": 0, "error": 0}
    for bad in (0, -1, 2.5, "2", None, True, 10**12, float("nan"), np.int64(0)):
        with pytest.raises(AlignEnvError, match="num_envs"):
            AlignVectorEnv(num_envs=bad)
    assert AlignVectorEnv(num_envs=np.int64(2)).num_envs == 2
    envs = {(f, m): AlignVectorEnv(num_envs=m, track="helpful", feedback=f) for f in ("pairwise", "scalar")
            for m in (1, 2, 3)}
    for k in range(n):
        (feedback, m), env = rng.choice(sorted(envs.items(), key=lambda kv: kv[0]))
        env.reset(seed=k)
        action = vector_action(rng, m, feedback)

        def step():
            _, rewards, *_ = env.step(action)
            assert rewards.shape == (m,) and np.isfinite(rewards).all()

        seen[outcome(step, *TEXT_WORDS, "responses_a", "responses_b", "vector")] += 1
    assert seen["ok"] > 0 and seen["error"] > 0, seen


def test_vector_env_ambiguous_pair_is_refused():
    env = AlignVectorEnv(num_envs=2, track="helpful")
    env.reset(seed=0)
    with pytest.raises(AlignEnvError, match="ambiguous pairwise vector action: two strings"):
        env.step(("a", "b"))
    with pytest.raises(AlignEnvError, match="list of \\(a, b\\) pairs"):
        _step_reset(3, [("a", "b")] * 3)
    env.step(np.array([["a1", "a2"], ["b1", "b2"]]))  # a (2, num_envs) array of strings is the columns form


def _step_reset(n, action):
    env = AlignVectorEnv(num_envs=n, track="helpful")
    env.reset(seed=0)
    return env.step(action)


def _families(lm, rm, bert):
    return {"rules": "rules", "likelihood": f"{lm}:likelihood?cache=off",
            "reconstruction": f"{lm}:likelihood?mode=reconstruction&cache=off",
            "llm_judge": f"{lm}:llm_judge?cache=off", "judge_calibrated": f"{lm}:llm_judge?calibrate=content_free",
            "judge_expected": f"{lm}:llm_judge?mode=pointwise&pointwise=expected",
            "judge_generate": f"{lm}:llm_judge?mode=pointwise&samples=1&max_new_tokens=4&temperature=0",
            "reward_model": f"{rm}:reward_model?cache=off", "embedding": f"{bert}:embedding?cache=off",
            "pool": f"pool?members=rules|{lm}:likelihood&combine=mean"}


def test_fuzz_annotator_families(short_lm, tiny_heads):
    """Per family, seeded batches of odd prompts and responses; the case count is asserted below."""
    rng, start = random.Random(SEED + 4), time.perf_counter()
    seen = {name: {"ok": 0, "error": 0} for name in _families("", "", "")}
    for name, spec in _families(short_lm, *tiny_heads).items():
        ann = make_annotator(spec, track="summarize")
        for _ in range(CASES["annotators"]):
            size = rng.choice([0, 1, 2, 3])
            prompts = [rng.choice([ITEM, "a bare prompt", texts(rng, long=False, bad=0.1)]) for _ in range(size)]
            a = [texts(rng, bad=0.05) for _ in range(size)]
            b = [texts(rng, bad=0.05) for _ in range(size + (rng.random() < 0.05))]
            kind = rng.choice(["pairwise", "score"])

            def call():
                out = ann.pairwise(prompts, a, b) if kind == "pairwise" else ann.score(prompts, a)
                valid_verdicts(out, size, kind)

            seen[name][outcome(call, *TEXT_WORDS, "annotator")] += 1
    assert sum(sum(v.values()) for v in seen.values()) == CASES["annotators"] * len(_families("", "", ""))
    assert all(v["ok"] > 0 for k, v in seen.items() if k != "judge_generate"), seen
    assert time.perf_counter() - start < 120


@pytest.mark.parametrize("family", ["likelihood", "llm_judge", "judge_expected", "reward_model", "embedding"])
def test_overlong_inputs_are_truncated_and_recorded(family, short_lm, tiny_heads):
    ann = make_annotator(_families(short_lm, *tiny_heads)[family], track="helpful")
    long = "many words " * 200
    out = ann.score([ITEM, ITEM], ["short", long]) if family == "judge_expected" else ann.pairwise(
        [ITEM, ITEM], ["short", long], ["short too", "x"])
    valid_verdicts(out, 2, "score" if family == "judge_expected" else "pairwise")
    flags = [d["truncated"] for d in ann.last_details]
    assert flags[1] is True and (family in ("llm_judge", "judge_expected") or flags[0] is False)


def _mutate(rng: random.Random, value, depth: int = 0):
    """A randomly corrupted copy of a JSON-like state."""
    junk = [None, -1, 2**70, "x", 1.5, float("nan"), True, [], {}, [0] * 3, {"bit_generator": "PCG64"}]
    if isinstance(value, dict) and value and depth < 3:
        out, key = dict(value), rng.choice(sorted(value))
        choice = rng.randrange(3)
        if choice == 0:
            del out[key]
        elif choice == 1:
            out[key] = rng.choice(junk)
        else:
            out[key] = _mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out = list(value)
        out[rng.randrange(len(out))] = rng.choice(junk + [out[0]])
        return out
    return rng.choice(junk)


@pytest.mark.parametrize("n", [200], ids=lambda n: f"{n}-cases")
def test_fuzz_corrupt_env_state_is_refused_and_changes_nothing(n):
    rng = random.Random(SEED + 5)
    envs = [AlignEnv(track="helpful"), AlignVectorEnv(num_envs=2, track="helpful")]
    for env in envs:
        env.reset(seed=1)
    good = [env.get_state() for env in envs]
    for k in range(n):
        env, state = envs[k % 2], good[k % 2]
        before = env.get_state()
        bad = _mutate(rng, state)
        if outcome(lambda: env.set_state(bad), "state", "sampler", "prompt id", "num_envs") == "error":
            assert env.get_state() == before  # a refused snapshot leaves the env as it was
        env.set_state(state)


class _Broken:
    spec, deterministic = "broken", True

    def __init__(self, out):
        self.out = out

    def pairwise(self, prompts, a, b):
        return self.out

    score = pairwise


@pytest.mark.parametrize("out", [None, "0.5", 0.5, [], [0.5, 0.5], ["x"], [True], [[0.5]], {"a": 1}])
def test_broken_annotator_output_is_a_clear_error(out):
    env = AlignEnv(track="helpful", annotator=_Broken(out))
    env.reset(seed=0)
    with pytest.raises(AlignEnvError, match="annotator 'broken'"):
        env.step(("a", "b"))


def test_unusable_numbers_are_abstentions():
    import torch

    for out, abstained in (([float("nan")], True), ([1.5], True), ([np.float32(0.25)], False),
                           ([torch.tensor(0.75)], False), ([None], True)):
        env = AlignEnv(track="helpful", annotator=_Broken(out))
        env.reset(seed=0)
        assert env.step(("a", "b"))[4]["abstained"] is abstained


def _prompt_input(rng: random.Random):
    shape = rng.randrange(5)
    if shape == 0:
        return texts(rng, bad=0.3)
    if shape == 1:
        return []
    if shape == 2:
        return [{"role": "user"}] if rng.random() < 0.5 else [rng.choice([None, "m", 3])]
    return [{"role": rng.choice(["user", "system", None]), "content": texts(rng, long=False, bad=0.3)}]


@pytest.mark.parametrize("n", [60], ids=lambda n: f"{n}-cases")
def test_fuzz_transformers_engine(n, short_lm):
    from align_env.engines.transformers_engine import TransformersEngine

    engine, rng = TransformersEngine.from_name(short_lm), random.Random(SEED + 6)
    settings = [1, 0, -1, 2.5, float("nan"), float("inf"), True, None, np.int64(2), 10**9]
    for _ in range(n):
        prompts = [_prompt_input(rng) for _ in range(rng.choice([0, 1, 2]))]
        kind = rng.randrange(3)
        if kind == 0:
            conts = [texts(rng, bad=0.3) for _ in prompts]
            call = lambda: engine.score(prompts, conts)  # noqa: E731
        elif kind == 1:
            call = lambda: engine.next_token_logprobs(prompts, [rng.choice(["A", "", None]), "B"])  # noqa: E731
        else:
            kw = {"n": rng.choice(settings[:3] + [2]), "temperature": rng.choice([0, 0.7, float("nan"), -1]),
                  "max_new_tokens": rng.choice([1, 2, 0, 64, 2.0])}
            call = lambda: engine.generate(prompts, **kw, seed=0)  # noqa: E731
        outcome(call, *TEXT_WORDS, "n must", "temperature", "max_new_tokens", "candidate", "message")
