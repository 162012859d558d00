import pytest

from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator, parse_spec


def test_parse_spec_forms():
    s = parse_spec("smollm2-135m:likelihood?mode=pmi&temperature=0.5&both_orders=true")
    assert (s.model, s.family) == ("smollm2-135m", "likelihood")
    assert s.params == {"mode": "pmi", "temperature": 0.5, "both_orders": True}
    assert parse_spec("rules").model is None and parse_spec("rules").family == "rules"
    hub = parse_spec("Qwen/Qwen2.5-0.5B-Instruct:llm_judge?suffix=prefer+the+shorter+answer")
    assert hub.model == "Qwen/Qwen2.5-0.5B-Instruct" and hub.params["suffix"] == "prefer the shorter answer"
    assert str(parse_spec("rules?length_penalty=0.01")) == "rules?length_penalty=0.01"


@pytest.mark.parametrize("bad, msg", [("", "non-empty"), ("model:", "no family"), ("rules?x", "bad parameters"),
                                      ("rulez", "Did you mean 'rules'"), ("m:rules", "takes no model"),
                                      ("rules?temprature=1", "Did you mean 'temperature'")])
def test_bad_specs_name_the_problem(bad, msg):
    with pytest.raises(AlignEnvError, match=msg):
        make_annotator(bad, track="helpful")


def test_annotator_object_passes_through():
    ann = make_annotator("rules", track="summarize")
    assert make_annotator(ann) is ann
    with pytest.raises(AlignEnvError, match="pairwise/score"):
        make_annotator(42)
