"""Synthetic comparisons: ranking rules as configuration and the length filter, on hand-made cases."""

from __future__ import annotations

import pytest

from agents.almost_demos import DEMOS, demonstrations
from agents.synthetic import RankingRules, compare, parse_configurations, prompt_messages
from align_env.errors import AlignEnvError

RULES = "model: big > small; shots: 3 > 1 > 0; demos: good > poor"


def test_rules_combine_by_dominance_and_are_transitive():
    rules = RankingRules(RULES)
    big3, big0, small3, small1p, small1g = parse_configurations(
        "big|3|good; big|0|-; small|3|good; small|1|poor; small|1|good")
    assert rules.beats(big3, small3) and not rules.beats(small3, big3)  # larger model, same prompting
    assert rules.beats(small3, small1g)  # more shots
    assert rules.beats(small1g, small1p)  # better demonstrations
    assert rules.beats(big3, small1p)  # better on all three
    assert rules.beats(small3, big0) is False and rules.beats(big0, small3) is False  # trade-off: same rank
    assert rules.beats(big0, small1p) is False  # bigger but fewer shots
    assert rules.axis_compare("shots", "3", "0") == 1  # 3 > 1 > 0 closes to 3 > 0
    assert rules.best([small1p, big3, small3]) == big3


@pytest.mark.parametrize("text,named", [
    ("shots: 3 > 1; shots: 1 > 3", ["'shots: 3 > 1'", "'shots: 1 > 3'"]),
    ("model: a > b > c; demos: good > poor; model: c > a", ["'model: a > b > c'", "'model: c > a'"]),
    ("shots: 1 > 1", ["'shots: 1 > 1'"]),
])
def test_contradictory_rules_are_an_error_naming_them(text, named):
    with pytest.raises(AlignEnvError, match="ranking rules contradict each other") as err:
        RankingRules(text)
    for clause in named:
        assert clause in str(err.value)
    assert "demos: good > poor" not in str(err.value)


def test_bad_rules_and_configurations_are_clear_errors():
    with pytest.raises(AlignEnvError, match="unknown ranking-rule axis 'shot'.*Did you mean 'shots'"):
        RankingRules("shot: 3 > 1")
    with pytest.raises(AlignEnvError, match="at least two values"):
        RankingRules("shots: 3")
    with pytest.raises(AlignEnvError, match="must look like 'model\\|shots\\|demos'"):
        parse_configurations("big|3; small|0|-")
    with pytest.raises(AlignEnvError, match="listed twice"):
        parse_configurations("big|0|good; big|0|poor")  # 0 shots: the set does not matter


def test_filter_drops_exactly_the_pairs_the_rules_say():
    configs = parse_configurations("big|3|good; small|3|good; small|0|-; big|0|-")
    rules = RankingRules("model: big > small; shots: 3 > 0")
    # word lengths 2, 6, 1, 3: mean 3, std sqrt(3.5) = 1.87, threshold mean - std/2 = 2.065
    prompt0 = ["two words", "a much longer answer of six", "x", "three words here"]
    # prompt 1: an empty answer and an identical pair
    prompt1 = ["same text", "same text", "", "other answer here"]
    kept, dropped = compare([prompt0, prompt1], configs, rules)
    got = {(k.prompt, k.chosen_config, k.rejected_config) for k in kept}
    # prompt 0 pairs (hi > lo):
    #   big3 > small3: len 2 < 6 and 2 < 2.065 -> length drop
    #   big3 > small0: kept (2 > 1);  big3 > big0: 2 < 3 and 2 < 2.065 -> length drop
    #   small3 > small0: kept;  small3 vs big0: same rank;  big0 > small0: kept
    # prompt 1: big3 > small3 identical; pairs with small0 (empty): 3 empty; big3 > big0 kept;
    #   small3 vs big0 same rank
    assert got == {(0, "big|3|good", "small|0|-"), (0, "small|3|good", "small|0|-"), (0, "big|0|-", "small|0|-"),
                   (1, "big|3|good", "big|0|-")}
    assert dropped == {"empty": 3, "same_rank": 2, "identical": 1, "length": 2}
    assert len(kept) + sum(dropped.values()) == 2 * 6  # every pair is kept or dropped by exactly one rule


def test_demonstrations_become_earlier_chat_turns():
    config = parse_configurations("m|2|poor; m|0|-")
    msgs = prompt_messages(config[0], "helpful", [{"role": "user", "content": "Q?"}])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == DEMOS["helpful"]["poor"][0][1] and msgs[-1]["content"] == "Q?"
    assert prompt_messages(config[1], "helpful", [{"role": "user", "content": "Q?"}]) == [
        {"role": "user", "content": "Q?"}]
    with pytest.raises(AlignEnvError, match="has 3 demonstrations; 5 shots asked"):
        demonstrations("helpful", "faithful", 5)
    with pytest.raises(AlignEnvError, match="unknown demonstration set 'best'"):
        demonstrations("helpful", "best", 1)
