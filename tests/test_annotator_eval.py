import json

import numpy as np
import pytest

from align_env.feedback import FAMILIES, register_family
from benchmarks import annotator_eval
from leaderboards.stats import bootstrap_ci


class AlwaysFirst:
    """A judge with total position bias: always prefers the response shown first."""

    spec = "always-first"
    deterministic = True

    def pairwise(self, prompts, a, b):
        return [1.0] * len(prompts)

    def score(self, prompts, responses):
        return [1.0] * len(prompts)


def always_first(spec, track):
    return AlwaysFirst()


@pytest.fixture
def biased_family():
    register_family("always_first", "tests.test_annotator_eval:always_first")
    yield "always_first"
    FAMILIES.pop("always_first")


def test_position_bias_is_measured(biased_family):
    res = annotator_eval.evaluate("always_first", "helpful", seed=0)
    swap = np.random.default_rng(0).random(res.pairs) < 0.5
    assert res.accuracy == pytest.approx(1 - swap.mean())  # right exactly when chosen was shown first
    assert res.position_consistency == 0.0
    assert res.abstention == 0.0 and res.params == 0


def test_rules_evaluation_and_outputs_are_resumable(tmp_path):
    out = tmp_path / "eval"
    first = annotator_eval.run(["rules"], ["harmless", "summarize"], out, max_pairs=20, progress=lambda *_: None)
    assert {r.track for r in first} == {"harmless-v0", "summarize-v0"}
    for r in first:
        assert 0 <= r.accuracy <= 1 and r.ci_low <= r.accuracy <= r.ci_high and r.pairs == 20
        assert r.selection_pairs + r.report_pairs == 20 and len(r.details) == 20
        assert r.report_ci_low <= r.report_accuracy <= r.report_ci_high
        assert r.position_consistency == 1.0  # the rules annotator is symmetric by construction
    for name in ("annotators.csv", "annotators.json", "annotators.md", "annotators.png"):
        assert (out / name).stat().st_size > 0
    files = sorted((out / "results").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = annotator_eval.run(["rules"], ["harmless", "summarize"], out, max_pairs=20, progress=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in sorted((out / "results").iterdir())] == stamps  # never overwritten
    assert [r.accuracy for r in again] == [r.accuracy for r in first]
    rows = json.loads((out / "annotators.json").read_text())
    assert {r["annotator"] for r in rows} == {"rules"}


def test_the_selection_and_report_halves_are_fixed_disjoint_and_order_free():
    import random

    from align_env.tracks import get_track
    from align_env.tracks.track import pair_halves

    for name in ("summarize", "helpful", "harmless"):
        track = get_track(name)
        sel, rep = track.selection_pairs, track.report_pairs
        assert len(sel) == len(rep) == 30 and not {p.id for p in sel} & {p.id for p in rep}
        shuffled = list(track.pairs)
        random.Random(0).shuffle(shuffled)
        assert {p.id for p in pair_halves(tuple(shuffled))[0]} == {p.id for p in sel}  # ids decide, not order


def test_the_recommendation_is_chosen_on_the_selection_half_and_never_an_oracle():
    def result(spec, selection, report, oracle=False, seconds=0.01):
        return annotator_eval.AnnotatorResult(
            annotator=spec, family=spec, model="-", params=0, track="helpful-v0", pairs=60, accuracy=0.5, ci_low=0,
            ci_high=1, selection_pairs=30, selection_accuracy=selection, selection_ci_low=0, selection_ci_high=1,
            report_pairs=30, report_accuracy=report, report_ci_low=0, report_ci_high=1, abstention=0,
            position_consistency=1, prefers_longer=0.5, seconds_per_judgement=seconds, tokens_per_judgement=0,
            oracle=oracle)

    rows = [result("a", 0.70, 0.55), result("b", 0.60, 0.80), result("oracle", 0.95, 0.95, oracle=True),
            result("a-but-slower", 0.70, 0.90, seconds=1.0)]
    assert annotator_eval.recommend(rows)["helpful"].annotator == "a"  # not b, the better one on the report half
    assert [r.annotator for r in annotator_eval.ranking(rows, "helpful")] == ["a", "a-but-slower", "b"]
    assert annotator_eval.reads_labels("rules?oracle=true") and not annotator_eval.reads_labels("rules")
    assert annotator_eval.reads_labels("pool?members=minilm-l6:embedding|rules%3Foracle%3Dtrue")


def test_bootstrap_is_seeded_and_covers_the_mean():
    x = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo < np.mean(x) < hi and hi - lo < 0.4


def test_the_packaged_ranking_is_the_committed_evaluation_chosen_on_the_selection_half():
    """align_env/feedback/ranking.json (the default evaluators, RECOMMENDED_ANNOTATORS) is read off the committed
    results in leaderboards/annotators: it must stay equal to them, ranked on the selection half."""
    from pathlib import Path

    from align_env.feedback import RECOMMENDED_ANNOTATORS
    from align_env.feedback.ranking import RANKING

    folder = Path(__file__).parents[1] / "leaderboards/annotators"
    results = annotator_eval.collected(folder, ("embedded", 0, None))
    assert {r.track for r in results} == {"summarize-v0", "helpful-v0", "harmless-v0"}
    assert all(r.pairs == 60 for r in results)
    assert RANKING == json.loads(json.dumps(annotator_eval.ranking_table(results)))
    for track, rows in RANKING.items():
        assert RECOMMENDED_ANNOTATORS[track] == rows[0]["annotator"]
        assert not annotator_eval.reads_labels(rows[0]["annotator"])
        accs = [r["selection_accuracy"] for r in rows]
        assert accs == sorted(accs, reverse=True)


def test_the_uncalibrated_judge_derived_from_a_calibrated_run_equals_the_measured_one(tiny_lm_dir):
    """The ladder derives the plain judge of its largest model from the calibrated run's per-order
    probabilities (same forward passes); here both are measured on a tiny random model and must agree."""
    plain = f"{tiny_lm_dir}:llm_judge"
    calibrated = f"{tiny_lm_dir}:llm_judge?calibrate=content_free"
    assert annotator_eval.uncalibrated_spec(calibrated) == plain
    assert annotator_eval.uncalibrated_spec(plain) is None
    assert annotator_eval.uncalibrated_spec(f"{tiny_lm_dir}:likelihood?calibrate=content_free") is None
    measured = annotator_eval.evaluate(plain, "harmless", max_pairs=16)
    derived = annotator_eval.derive_uncalibrated(annotator_eval.evaluate(calibrated, "harmless", max_pairs=16))
    assert derived.annotator == plain and derived.derived_from == calibrated
    assert [r["verdict"] for r in derived.details] == pytest.approx([r["verdict"] for r in measured.details])
    for key in ("accuracy", "selection_accuracy", "report_accuracy", "report_ci_low", "report_ci_high",
                "position_consistency", "order_prior", "calibrated_consistency", "single_order_accuracy"):
        assert getattr(derived, key) == pytest.approx(getattr(measured, key), nan_ok=True), key
    assert measured.derived_from == ""


def test_collected_adds_derived_judges_only_where_not_measured(tmp_path, tiny_lm_dir):
    calibrated = f"{tiny_lm_dir}:llm_judge?calibrate=content_free"
    annotator_eval.run([calibrated], ["helpful"], tmp_path, max_pairs=8, progress=lambda *_: None)
    rows = annotator_eval.collected(tmp_path, ("embedded", 0, 8))
    assert sorted(r.annotator for r in rows) == sorted([calibrated, f"{tiny_lm_dir}:llm_judge"])
    assert len(list((tmp_path / "results").glob("*.json"))) == 1  # derived results are computed, not stored
    annotator_eval.run([f"{tiny_lm_dir}:llm_judge"], ["helpful"], tmp_path, max_pairs=8, progress=lambda *_: None)
    rows = annotator_eval.collected(tmp_path, ("embedded", 0, 8))
    assert [r.derived_from for r in rows if r.annotator == f"{tiny_lm_dir}:llm_judge"] == [""]
