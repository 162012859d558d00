import pytest
import torch

from align_env.engines import Engine
from align_env.engines.transformers_engine import PromptTooLongError, TransformersEngine

MSG = [{"role": "user", "content": "Write a TL;DR of this post about my landlord."}]


def test_engine_satisfies_protocol(tiny_engine):
    assert isinstance(tiny_engine, Engine)


def test_generate_n_samples_seeded(tiny_engine):
    prompts = [MSG, [{"role": "user", "content": "How do I boil an egg?"}]]
    a = tiny_engine.generate(prompts, n=3, temperature=0.9, max_new_tokens=12, seed=1)
    b = tiny_engine.generate(prompts, n=3, temperature=0.9, max_new_tokens=12, seed=1)
    c = tiny_engine.generate(prompts, n=3, temperature=0.9, max_new_tokens=12, seed=2)
    assert [len(x) for x in a] == [3, 3]
    assert [[g.text for g in x] for x in a] == [[g.text for g in x] for x in b]
    assert [[g.text for g in x] for x in a] != [[g.text for g in x] for x in c]
    for gens in a:
        for g in gens:
            assert 0 <= g.tokens <= 12 and g.finish_reason in ("stop", "length") and g.prompt_tokens > 0


def test_left_padded_batch_matches_one_by_one_greedy(tiny_engine):
    prompts = [MSG, [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer request " * 5}]]
    batched = [g[0].text for g in tiny_engine.generate(prompts, temperature=0, max_new_tokens=10)]
    single = [tiny_engine.generate([p], temperature=0, max_new_tokens=10)[0][0].text for p in prompts]
    assert batched == single


def test_n_samples_share_one_prefill_and_match_single_greedy(tiny_engine):
    # n > 1 runs each prompt once and repeats its cache; greedy samples must equal the n == 1 answer.
    prompts = [MSG, [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer request " * 5}]]
    single = [g[0].text for g in tiny_engine.generate(prompts, temperature=0, max_new_tokens=10)]
    shared = tiny_engine.generate(prompts, n=3, temperature=0, max_new_tokens=10)
    assert [[g.text for g in gens] for gens in shared] == [[s] * 3 for s in single]
    assert all(g.prompt_tokens == gens[0].prompt_tokens for gens in shared for g in gens)


def test_score_matches_a_direct_forward_pass(tiny_engine):
    ctx, cont = "User: hello there\nAssistant:", " general kenobi"
    (s,) = tiny_engine.score([ctx], [cont])
    tok = tiny_engine.tokenizer
    ids = tiny_engine.encode(ctx) + tok(cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tiny_engine.encode(ctx))
    with torch.no_grad():
        logp = torch.log_softmax(tiny_engine.model(torch.tensor([ids])).logits[0].float(), -1)
    expected = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
    assert s.tokens == len(ids) - n_ctx
    assert s.logprob == pytest.approx(expected, abs=1e-4)
    # batching with other rows (right padding) gives the same number
    batch = tiny_engine.score([ctx, "x", ctx + " and a longer context"], [cont, " y", cont])
    assert batch[0].logprob == pytest.approx(s.logprob, abs=1e-4)


def test_overflow_policies(tiny_lm_dir):
    long_prompt = [{"role": "user", "content": "word " * 600}]
    eng = TransformersEngine.from_name(tiny_lm_dir)
    (gens,) = eng.generate([long_prompt], temperature=0, max_new_tokens=8)
    assert gens[0].truncated_prompt and gens[0].prompt_tokens == eng.max_context - 8
    assert eng.stats["truncated_prompts"] == 1
    strict = TransformersEngine.from_name(tiny_lm_dir, overflow="error")
    with pytest.raises(PromptTooLongError, match="does not fit the context of 256"):
        strict.generate([long_prompt], max_new_tokens=8)
    (score,) = eng.score([long_prompt], ["ok"])
    assert score.truncated and score.context_tokens + score.tokens <= eng.max_context


def test_bad_generation_arguments(tiny_engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.generate([MSG], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_engine.generate([MSG], top_p=0)
    with pytest.raises(TypeError, match="chat messages"):
        tiny_engine.generate([42])


def test_plain_template_for_base_models(tiny_lm_dir):
    eng = TransformersEngine.from_name(tiny_lm_dir)
    eng.has_chat_template = False
    text = eng.render([{"role": "user", "content": "Hello"}])
    assert text == "User: Hello\n\nAssistant:"
    assert eng.encode(text)[0] == eng.tokenizer.bos_token_id


def test_next_token_logprobs_match_score(tiny_engine):
    ctx = [{"role": "user", "content": "Which is better, A or B? Answer with one letter."}]
    (lp,) = tiny_engine.next_token_logprobs([ctx], [" A", " B"])
    sa, sb = tiny_engine.score([ctx, ctx], [" A", " B"])
    assert lp[" A"] == pytest.approx(sa.token_logprobs[0], abs=1e-4)
    assert lp[" B"] == pytest.approx(sb.token_logprobs[0], abs=1e-4)
    batch = tiny_engine.next_token_logprobs([ctx, [{"role": "user", "content": "hi"}]], [" A", " B"])
    assert batch[0][" A"] == pytest.approx(lp[" A"], abs=1e-4)


def test_make_engine_shares_and_suggests(tiny_lm_dir):
    from align_env.engines import make_engine
    from align_env.errors import AlignEnvError

    assert make_engine("transformers", tiny_lm_dir) is make_engine("transformers", tiny_lm_dir)
    with pytest.raises(AlignEnvError, match="Did you mean 'transformers'"):
        make_engine("transformer", tiny_lm_dir)


def test_plain_template_generation_stops_at_the_next_user_turn(tiny_lm_dir):
    eng = TransformersEngine.from_name(tiny_lm_dir)
    eng.has_chat_template, eng.stop_strings = False, ["\nUser:"]
    gens = eng.generate([[{"role": "user", "content": "Hello"}]] * 4, n=2, temperature=1.0, max_new_tokens=40, seed=0)
    assert all("\nUser:" not in g.text for row in gens for g in row)
