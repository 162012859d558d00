"""The in-process llama.cpp engine on the embedded SmolLM2-135M GGUF."""

from __future__ import annotations

import math

import pytest

from align_env.engines import Engine, make_engine
from align_env.errors import AlignEnvError

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'align-env[llama]')")
try:  # the package's own imports need the `llm` CLI, which the README installs without: look for the file
    from align_env.models import gguf_path

    gguf_path("smollm2-135m")
except AlignEnvError as exc:
    pytest.skip(f"the smollm2 GGUF is not available: {exc}", allow_module_level=True)

pytestmark = pytest.mark.embedded

MSG = [{"role": "user", "content": "Which is a fruit? A: apple B: car. Answer with a single letter."}]
OTHER = [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.fixture(scope="module")
def engine():
    # make_engine shares the instance with the other test modules that ask for the same options
    return make_engine("llama_cpp", "smollm2-135m", n_ctx=512, n_threads=1)


def test_protocol_and_capabilities(engine):
    assert isinstance(engine, Engine)
    assert engine.capabilities == {"generate", "score", "next_token"}
    assert engine.max_context == 512 and "smollm2-135m" in repr(engine)


def test_chat_render_uses_the_gguf_template(engine):
    text = engine.render(MSG)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\n" + MSG[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    assert engine.render("already rendered") == "already rendered"
    ids = engine.encode(text)
    assert ids[0] == engine.tokenize("<|im_start|>")[0] and len(ids) < len(text) // 2  # special tokens parsed
    with pytest.raises(TypeError):
        engine.render(42)


def test_chat_render_matches_the_transformers_tokenizer_when_cached(engine):
    from align_env.models import cache_dir, cache_entry_ok

    folder = cache_dir() / "models" / "smollm2-135m"
    if not cache_entry_ok(folder):
        pytest.skip("smollm2-135m has not been converted to safetensors in the cache yet")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    expected = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert engine.render(MSG) == expected
    assert engine.encode(expected) == tok(expected, add_special_tokens=False)["input_ids"]


def test_generate_is_seeded_and_independent_of_the_batch(engine):
    kw = {"n": 2, "temperature": 1.0, "max_new_tokens": 5}
    a = engine.generate([MSG, OTHER], seed=1, **kw)
    b = engine.generate([MSG, OTHER], seed=1, **kw)
    c = engine.generate([MSG, OTHER], seed=2, **kw)
    alone = engine.generate([MSG], seed=1, **kw)
    texts = [[g.text for g in row] for row in a]
    assert texts == [[g.text for g in row] for row in b]
    assert [g.text for g in alone[0]] == texts[0]  # seeded by (seed, index, sample): not by the other prompts
    assert [[g.text for g in row] for row in c] != texts
    assert texts[1][0] != texts[1][1]  # n samples differ
    for row in a:
        assert len(row) == 2
        for g in row:
            assert 0 < g.tokens <= 5 and g.finish_reason in ("stop", "length") and g.prompt_tokens > 30
    greedy = engine.generate([MSG], temperature=0, max_new_tokens=4)
    assert greedy == engine.generate([MSG], temperature=0, max_new_tokens=4)
    assert greedy[0][0].text.startswith("A")


def test_score_agrees_with_next_token_and_with_itself(engine):
    ctx = engine.render(MSG)
    (nt,) = engine.next_token_logprobs([MSG], ["A", "B"])
    assert all(math.isfinite(v) and v < 0 for v in nt.values()) and nt["A"] > nt["B"]
    sa, sb = engine.score([MSG, ctx], ["A", "B"])
    # The context is cached by now, so only its last token is evaluated again, alone. llama.cpp's CPU kernels
    # can differ between a 1-token and a many-token evaluation: on some CPUs the results are equal to 1e-4,
    # on others (seen: AMD EPYC with AVX2, no AVX-512) they differ by up to 0.07 nats. The ranking must not change.
    assert sa.tokens == 1 and sa.logprob == pytest.approx(nt["A"], abs=0.1)
    assert sb.logprob == pytest.approx(nt["B"], abs=0.1) and sa.logprob > sb.logprob
    assert sa.context_tokens == len(engine.encode(ctx))
    # Multi-token continuations: the same numbers whatever the batch, its order and the cached prefix.
    conts = [": apple is a fruit.", ": a car is not a fruit."]
    alone = [engine.score([MSG], [c])[0] for c in conts]
    engine.generate([OTHER], temperature=0, max_new_tokens=3)  # leaves another sequence in the cache
    batch = engine.score([MSG, "", MSG], [conts[1], "Hello world", conts[0]])
    assert batch[0].logprob == pytest.approx(alone[1].logprob, abs=1e-3)
    assert batch[2].logprob == pytest.approx(alone[0].logprob, abs=1e-3)
    assert batch[0].tokens == len(batch[0].token_logprobs) == len(engine.tokenize(conts[1]))
    assert batch[1].context_tokens == 1 and batch[1].tokens == len(engine.tokenize("Hello world"))
    assert engine.stats["reused_tokens"] > 0


def test_overflow_policies():
    from align_env.engines.llama_cpp_engine import LlamaCppEngine
    from align_env.engines.transformers_engine import PromptTooLongError

    small = LlamaCppEngine.from_name("smollm2-135m", n_ctx=256, n_threads=1)
    long_prompt = [{"role": "user", "content": "word " * 300}]
    try:
        (gens,) = small.generate([long_prompt], temperature=0, max_new_tokens=2)
        assert gens[0].truncated_prompt and gens[0].prompt_tokens == 254
        assert small.stats["truncated_prompts"] == 1
        (score,) = small.score([long_prompt], ["ok then"])
        assert score.truncated and score.context_tokens + score.tokens == 256
        small.overflow = "error"
        with pytest.raises(PromptTooLongError, match="does not fit the context of 256"):
            small.generate([long_prompt], max_new_tokens=2)
    finally:
        small.close()
    with pytest.raises(AlignEnvError, match="closed"):
        small.score([MSG], ["A"])


def test_bad_arguments(engine):
    with pytest.raises(AlignEnvError, match="share their first token"):
        engine.next_token_logprobs([MSG], [" A", " A or B"])
    with pytest.raises(AlignEnvError, match="max_new_tokens"):
        engine.generate([MSG], max_new_tokens=0)
    with pytest.raises(ValueError, match="2 contexts but 1"):
        engine.score([MSG, MSG], ["a"])


def test_model_names_are_checked(tmp_path):
    from align_env.engines.llama_cpp_engine import LlamaCppEngine

    with pytest.raises(AlignEnvError, match="smollm2-135m"):
        LlamaCppEngine.from_name("smollm2-13m")
    with pytest.raises(AlignEnvError, match="does not exist"):
        LlamaCppEngine.from_name(str(tmp_path / "missing.gguf"))


def test_annotators_by_spec_run_on_it(engine):
    from align_env.feedback import make_annotator

    opts = "engine=llama_cpp&n_ctx=512&n_threads=1&cache=off"
    judge = make_annotator(f"smollm2-135m:llm_judge?{opts}")
    assert judge.engine is engine  # the same options share the loaded model
    pmi = make_annotator(f"smollm2-135m:likelihood?mode=pmi&{opts}")
    verdicts = pmi.pairwise(["Name a fruit.", "Say hi."], ["An apple is a fruit.", ""], ["Bricks.", "Hi there!"])
    assert all(0.0 <= v <= 1.0 for v in verdicts) and verdicts[1] < 0.5  # an empty response loses
    with pytest.raises(AlignEnvError, match="engine 'llama_cpp' takes no option 'dtype'"):
        make_annotator(f"smollm2-135m:likelihood?dtype=float32&{opts}")
