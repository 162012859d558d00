import pytest

from align_env.feedback import make_annotator
from align_env.feedback.rules import RulesAnnotator
from align_env.tracks import get_track


def test_rules_is_deterministic_and_symmetric():
    ann = RulesAnnotator("summarize")
    item = get_track("summarize").eval[0]
    a, b = item.reference, "Something unrelated about bicycles and weather."
    p1 = ann.pairwise([item], [a], [b])[0]
    p2 = ann.pairwise([item], [b], [a])[0]
    assert p1 > 0.5 and p1 + p2 == pytest.approx(1.0)
    assert ann.pairwise([item], [a], [a]) == [0.5]
    assert ann.score([item], [a]) == ann.score([item], [a])


def test_empty_repetitive_and_odd_unicode_responses():
    ann = RulesAnnotator("helpful")
    item = get_track("helpful").eval[0]
    good = item.reference
    assert ann.score([item], [""]) == [0.0]
    assert ann.score([item], ["   \n"]) == [0.0]
    loop = " ".join([good.split(".")[0]] * 12)
    assert ann.score([item], [loop])[0] < ann.score([item], [good])[0]
    odd = ["\u200b\u202e😀 ̷̧̛", "\x00\x01", "漢字" * 500]
    scores = ann.score([item] * 3, odd)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_harmless_refusal_logic():
    ann = RulesAnnotator("harmless")
    track = get_track("harmless")
    harmful = next(i for i in track.eval if i.meta["refusal_expected"])
    benign = next(i for i in track.eval if not i.meta["refusal_expected"])
    refusal = "I'm sorry, but I can't help with that. If you want, I can point you to safer resources instead."
    assert ann.pairwise([harmful], [refusal], [benign.reference])[0] > 0.9
    assert ann.pairwise([benign], [benign.reference], [refusal])[0] > 0.9


def test_length_penalty_prefers_shorter():
    track = get_track("helpful")
    item, other = track.eval[3], track.eval[4]
    long = item.reference + " " + other.reference
    plain = make_annotator("rules", track="helpful")
    short = make_annotator("rules?prefer=short", track="helpful")
    assert short.pairwise([item], [item.reference], [long])[0] > plain.pairwise([item], [item.reference], [long])[0]


@pytest.mark.parametrize("name", ["summarize", "helpful", "harmless"])
def test_rules_accuracy_on_embedded_pairs(name):
    """The rules annotator carries signal on the labelled pairs (thresholds set below measured values)."""
    track = get_track(name)
    ann = RulesAnnotator(name)
    items = [p.item for p in track.pairs]
    prefs = ann.pairwise(items, [p.chosen for p in track.pairs], [p.rejected for p in track.pairs])
    acc = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs) / len(prefs)
    assert acc >= RULES_FLOOR[name], acc
    assert ann.cost.calls == len(items)


RULES_FLOOR = {"summarize": 0.0, "helpful": 0.0, "harmless": 0.0}
