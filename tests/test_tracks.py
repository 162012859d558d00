import json

import pytest

from align_env import text_metrics as tm
from align_env.errors import AlignEnvError
from align_env.tracks import TRACKS, get_track, hub
from align_env.tracks.dedup import near_duplicates

NAMES = ["summarize", "helpful", "harmless"]


@pytest.mark.parametrize("name", NAMES)
def test_embedded_sizes_and_fields(name):
    track = get_track(name)
    sizes = track.sizes()
    assert sizes["train"] >= 150 and sizes["eval"] >= 50 and sizes["pairs"] >= 60
    assert track.id == f"{name}-v0" and track.rubric
    for item in track.train + track.eval:
        assert item.prompt.strip() and item.reference and item.reference.strip()
    for pair in track.pairs:
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected and pair.why


@pytest.mark.parametrize("name", NAMES)
def test_embedded_sets_have_no_near_duplicates(name):
    track = get_track(name)
    texts = [i.source for i in track.train + track.eval] + [p.item.source for p in track.pairs]
    assert near_duplicates(texts) == []


def test_near_duplicate_detector_can_fail():
    base = "My landlord kept my deposit after I moved out and now he will not answer my calls at all."
    assert near_duplicates([base, base.replace("calls", "texts")])
    assert not near_duplicates([base, "How do I bake sourdough bread at home with a cast iron pot?"])


@pytest.mark.parametrize("name", NAMES)
def test_embedded_hash_is_pinned(name):
    """A silent change to an embedded set fails: the hash is pinned per version."""
    spec = TRACKS[name]
    assert spec.embedded_hash is not None, "pin the embedded data hash in align_env.tracks.TRACKS"
    assert get_track(name).content_hash == spec.embedded_hash


def test_summarize_items_are_forum_posts_with_short_references():
    track = get_track("summarize")
    for item in track.train + track.eval:
        n = len(tm.words(item.source))
        assert 70 <= n <= 270, (item.id, n)
        assert len(tm.words(item.reference)) <= 45, item.id
        assert item.meta["title"] and item.source.strip() in item.prompt and item.prompt.rstrip().endswith("at most 40 words.")


def test_helpful_categories_are_varied():
    cats = {i.meta["category"] for i in get_track("helpful").train}
    assert cats == {"how-to", "explanation", "advice", "rewriting", "creative"}


def test_harmless_labels_mix_harmful_and_benign():
    track = get_track("harmless")
    for split in (track.train, track.eval):
        harmful = [i for i in split if i.meta["refusal_expected"]]
        assert 0.35 <= len(harmful) / len(split) <= 0.7
        assert all(i.meta["category"] for i in harmful)
        assert all(i.meta["refusal_expected"] == i.meta["harmful"] for i in split)
    # references behave as labelled: refusals where expected, answers elsewhere
    agree = [tm.is_refusal(i.reference) == i.meta["refusal_expected"] for i in track.train + track.eval]
    assert sum(agree) / len(agree) >= 0.9


def test_gold_checks():
    track = get_track("harmless")
    harmful = next(i for i in track.eval if i.meta["refusal_expected"])
    assert track.gold_check(harmful, "I'm sorry, but I can't help with that.")["refusal_correct"] == 1.0
    assert track.gold_check(harmful, "Sure, here you go.")["harmful_compliance"] == 1.0
    s = get_track("summarize")
    item = s.eval[0]
    assert s.gold_check(item, item.reference)["rouge_l"] == pytest.approx(1.0)


def test_unknown_track_and_source():
    with pytest.raises(AlignEnvError, match="Did you mean 'helpful'"):
        get_track("helpfull")
    with pytest.raises(AlignEnvError, match="Did you mean 'hub'"):
        get_track("helpful", source="hubb")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


TLDR_ROWS = [
    {"prompt": "SUBREDDIT: r/relationships\n\nTITLE: My friend forgot my birthday\n\nPOST: We have been friends for ten "
               "years and she forgot. I am hurt but do not want to make a scene.\n\nTL;DR:",
     "completion": " Best friend forgot my birthday; hurt but don't want drama."},
    {"prompt": "SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay off my car?\n\nPOST: I have 4000 left at 7% and "
               "6000 in savings.\n\nTL;DR:", "completion": " Pay off a 7% car loan with savings?"},
]


def test_hub_loaders_on_schema_files(tmp_path):
    tldr = {"train": _write_jsonl(tmp_path / "tldr_train.jsonl", TLDR_ROWS),
            "validation": _write_jsonl(tmp_path / "tldr_val.jsonl", TLDR_ROWS[:1])}
    comparisons = [{"info": {"id": "t3_x", "post": "I lost my keys twice this week.", "title": "Keys",
                             "subreddit": "offmychest", "site": None, "article": None},
                    "summaries": [{"text": " Lost keys twice.", "policy": "sup", "note": ""},
                                  {"text": " Found a cat.", "policy": "ppo", "note": ""}],
                    "choice": 0, "worker": "w", "batch": "b1", "split": "valid1", "extra": {"confidence": 8}}]
    comp = {"validation": _write_jsonl(tmp_path / "comparisons.jsonl", comparisons)}
    hh_rows = [{"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.\n\nHuman: "
                          "Soft?\n\nAssistant: Six minutes.",
                "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for nine minutes.\n\nHuman: "
                            "Soft?\n\nAssistant: No idea."}]
    hh = {"train": _write_jsonl(tmp_path / "hh_train.jsonl", hh_rows),
          "test": _write_jsonl(tmp_path / "hh_test.jsonl", hh_rows)}

    summarize = get_track("summarize", source="hub", data_files={"tldr": tldr, "comparisons": comp})
    assert summarize.sizes() == {"train": 2, "eval": 1, "pairs": 1}
    first = summarize.train[0]
    assert first.meta == {"title": "My friend forgot my birthday", "forum": "relationships"}
    assert first.source.startswith("We have been friends") and "TL;DR" not in first.source
    assert first.reference == "Best friend forgot my birthday; hurt but don't want drama."
    embedded = get_track("summarize").train[0]
    request = embedded.prompt.split(embedded.source.strip())[1]  # the same TL;DR request after the post
    assert first.prompt == "Forum: relationships\nTitle: My friend forgot my birthday\n\n" + first.source + request
    pair = summarize.pairs[0]
    assert (pair.chosen, pair.rejected) == ("Lost keys twice.", "Found a cat.")
    assert summarize.id == "summarize-v0@trl-lib/tldr"

    helpful = get_track("helpful", source="hub", data_files={"hh": hh})
    item = helpful.train[0]
    assert item.prompt == "Soft?" and item.reference == "Six minutes."
    assert [m["role"] for m in item.messages] == ["user", "assistant", "user"]
    assert helpful.pairs[0].chosen == "Six minutes." and helpful.pairs[0].rejected == "No idea."
    harmless = get_track("harmless", source="hub", data_files={"hh": hh}, max_items=1)
    assert harmless.sizes() == {"train": 1, "eval": 1, "pairs": 1}


def test_hub_loader_schema_errors(tmp_path):
    bad = {"train": _write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])}
    with pytest.raises(AlignEnvError, match="missing columns"):
        hub.load_tldr(lambda p, m: p, data_files=bad)
    wrong = {"train": _write_jsonl(tmp_path / "w.jsonl", [{"prompt": "no fields", "completion": "x"}])}
    with pytest.raises(AlignEnvError, match="not a TL;DR prompt"):
        hub.load_tldr(lambda p, m: p, data_files=wrong)
    with pytest.raises(AlignEnvError, match="HH-RLHF transcript"):
        hub.split_hh_dialogue("\n\nHuman: only a question")
