"""``align-env eval`` end to end on a tiny model's run, the results store, kill-and-resume, stamps, self-evaluation.

Real parts: the tiny random Llama of conftest, a real online-DPO run through the loop, the deterministic ``rules``
evaluator, a real SQLite file, and a real SIGKILL of an evaluation subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from align_env.errors import AlignEnvError
from benchmarks.evaluation import StampMismatch, check_comparable, evaluate, markdown
from benchmarks.runner import run_one
from leaderboards.store import ResultStore, StoreError

ITEMS = 10


@pytest.fixture(scope="module")
def trained_run(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "online"
    run_one("online-dpo", "helpful", "rules", steps=2, num_envs=2, seed=0, out_dir=out, progress=False,
            overrides={"model": tiny_lm_dir, "max_new_tokens": 12, "lr": 1e-2})
    return out


@pytest.fixture(scope="module")
def other_lm_dir(tiny_lm_dir, tmp_path_factory):
    """Another tiny model (the same one with re-drawn weights): its answers differ from the run's on every prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("other-llama")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(path)
    return str(path)


def _eval(run, tiny_lm_dir, store, **kw):
    kw.setdefault("evaluator", "rules?length_penalty=0.002")
    return evaluate([str(run)], reference=f"initial?model={tiny_lm_dir}", store=store, max_items=ITEMS,
                    progress=lambda *_: None, **kw)


def _count(store, table) -> int:
    with sqlite3.connect(store) as db:
        try:
            return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        except sqlite3.OperationalError:  # the store is being created
            return 0


def test_eval_end_to_end_stores_answers_judgements_and_statistics(trained_run, tiny_lm_dir, tmp_path):
    store = tmp_path / "results.sqlite"
    ev = _eval(trained_run, tiny_lm_dir, store)
    (res,) = ev.policies
    assert _count(store, "answers") == 2 * ITEMS  # the policy's and the reference's, once each
    assert _count(store, "judgements") == ITEMS
    with ResultStore(store) as db:
        (jset,) = [r[0] for r in db.db.execute("SELECT judgement_set FROM judgement_sets")]
        judged = db.judgements(jset)
    for j in judged.values():
        if j["identical"]:
            assert j["verdict"] == 0.5
        else:  # both single orders and the debiased verdict are kept
            assert 0 <= j["policy_first"] <= 1 and 0 <= j["reference_first"] <= 1
            assert j["verdict"] == pytest.approx((j["policy_first"] + j["reference_first"]) / 2)
    assert res["wins"] + res["ties"] + res["losses"] + res["abstained"] == ITEMS
    assert 0 <= res["win_rate"]["low"] <= res["win_rate"]["value"] <= res["win_rate"]["high"] <= 1
    assert res["win_rate"]["value"] == pytest.approx((res["wins"] + 0.5 * res["ties"]) / (ITEMS - res["abstained"]))
    assert {"gold_reference_f1", "gold_words", "gold_refused", "mean_tokens", "mean_words"} <= res["gold"].keys()
    assert res["self_evaluated"] is False and res["training_annotator"] == "rules"
    assert res["cost"]["annotator_calls"] == 4 and res["cost"]["trained_tokens"] > 0  # from the run's result.json
    assert res["cost"]["eval_annotator_calls"] == ITEMS - res["identical"]
    assert {r["player"] for r in ev.ratings} == {res["policy"], ev.reference["policy"]}
    stamp = res["stamp"]
    assert stamp["evaluator"] == "rules?length_penalty=0.002" and stamp["track"] == "helpful-v0"
    assert stamp["decoding"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12}  # from the run's config
    assert {"track_hash", "split", "version", "commit"} <= stamp.keys()
    table = markdown(ev)
    assert res["policy"] in table and "win rate vs reference" in table and "†" not in table.split("\n", 2)[2]

    # again: nothing is generated or judged twice, and the stored result is returned unchanged
    before = _count(store, "results")
    again = _eval(trained_run, tiny_lm_dir, store)
    assert _count(store, "answers") == 2 * ITEMS and _count(store, "judgements") == ITEMS
    assert _count(store, "results") == before and again.policies[0]["win_rate"] == res["win_rate"]
    # another evaluator is a new result beside the first, which stays
    _eval(trained_run, tiny_lm_dir, store, evaluator="rules")
    assert _count(store, "results") == before + 1 and _count(store, "answers") == 2 * ITEMS


def test_self_evaluation_is_marked(trained_run, tiny_lm_dir, tmp_path):
    ev = _eval(trained_run, tiny_lm_dir, tmp_path / "r.sqlite", evaluator="rules")
    assert ev.policies[0]["self_evaluated"] is True
    assert f"{ev.policies[0]['policy']} †" in markdown(ev)


def test_comparing_results_with_different_stamps_is_refused(trained_run, tiny_lm_dir, tmp_path):
    a = _eval(trained_run, tiny_lm_dir, tmp_path / "a.sqlite").policies[0]
    b = _eval(trained_run, tiny_lm_dir, tmp_path / "b.sqlite", evaluator="rules", max_new_tokens=6).policies[0]
    check_comparable([a, a])
    with pytest.raises(StampMismatch, match=r"different conditions \(decoding: .*; evaluator: "):
        check_comparable([a, b])


def test_bad_policies_get_clear_errors(trained_run, tiny_lm_dir, tmp_path):
    store = tmp_path / "r.sqlite"
    with pytest.raises(AlignEnvError, match="does not exist"):
        evaluate(["runs/nope"], evaluator="rules", store=store)
    with pytest.raises(AlignEnvError, match="agent that trains: evaluate a finished run folder"):
        evaluate(["online-dpo"], track="helpful", evaluator="rules", store=store)
    with pytest.raises(AlignEnvError, match="give --track"):
        evaluate(["initial"], evaluator="rules", store=store)
    with pytest.raises(AlignEnvError, match="also among the evaluated policies"):
        evaluate(["initial"], track="helpful", reference="initial", evaluator="rules", store=store)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((trained_run / "config.json").read_text())
    with pytest.raises(AlignEnvError, match="unfinished run"):
        evaluate([str(unfinished)], evaluator="rules", store=store)
    with pytest.raises(AlignEnvError, match="split must be one of"):
        evaluate([str(trained_run)], evaluator="rules", store=store, split="pairs")


# -- kill and resume ----------------------------------------------------------------------------------------
SLOW_FAMILY = textwrap.dedent('''
    import time
    from align_env.feedback import register_family
    from align_env.feedback.rules import RulesAnnotator

    class SlowRules(RulesAnnotator):
        def pairwise(self, prompts, a, b):
            time.sleep(0.25 * len(prompts))
            return super().pairwise(prompts, a, b)

    def slow(spec, track):
        return SlowRules(track, spec=str(spec))

    register_family("slow_rules", "slow_family:slow")
''')


def _eval_script(tmp_path: Path, run: Path, reference_model: str, store: Path) -> list[str]:
    (tmp_path / "slow_family.py").write_text(SLOW_FAMILY)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import slow_family\n"
            "from benchmarks.evaluation import evaluate\n"
            f"evaluate([{str(run)!r}], reference='initial?model={reference_model}', evaluator='slow_rules', "
            f"store={str(store)!r}, max_items=24, progress=lambda *_: None)\n")
    return [sys.executable, "-c", code]


def test_a_killed_evaluation_resumes_with_no_lost_or_duplicated_judgement(trained_run, other_lm_dir, tmp_path):
    store = tmp_path / "killed.sqlite"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(_eval_script(tmp_path, trained_run, other_lm_dir, store), env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.exists() and _count(store, "judgements") >= 8:  # a committed chunk, more to come
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _count(store, "judgements")
    assert 8 <= done < 24 and _count(store, "results") == 0
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT SUM(identical) FROM judgements").fetchone()[0] == 0  # every pair went to the judge
    sys.path.insert(0, str(tmp_path))  # resume (and the clean run) in this process: the same code, less start-up
    try:
        import slow_family  # noqa: F401  (registers slow_rules)

        def again(path):
            return evaluate([str(trained_run)], reference=f"initial?model={other_lm_dir}", evaluator="slow_rules",
                            store=path, max_items=24, progress=lambda *_: None)

        again(store)
        assert _count(store, "judgements") == 24 and _count(store, "results") == 1
        clean = tmp_path / "clean.sqlite"
        again(clean)
    finally:
        sys.path.remove(str(tmp_path))
    rows = lambda p: sqlite3.connect(p).execute(  # noqa: E731
        "SELECT item_id, policy_first, reference_first, verdict FROM judgements ORDER BY item_id").fetchall()
    assert rows(store) == rows(clean)  # the resumed evaluation judged exactly what an uninterrupted one did


# -- the store ----------------------------------------------------------------------------------------------
ODD = ["it's \"quoted\"", "'; DROP TABLE answers; --", "émoji 😀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u202e reversed \u200b zero-width", "x" * 100_000]


def test_the_store_keeps_model_text_as_data(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as db:
        db.declare_answer_set("set", "p", {"note": ODD[1]})
        db.put_answers("set", "p", [{"item_id": f"i{k}", "prompt": t, "answer": t, "tokens": 1, "seconds": 0.0}
                                    for k, t in enumerate(ODD)], "commit")
    with ResultStore(path) as db:
        got = db.answers("set")
        assert [got[f"i{k}"]["answer"] for k in range(len(ODD))] == ODD
        assert _count(path, "answers") == len(ODD)  # the table survived the text


def test_a_finished_result_is_never_overwritten(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as db:
        first = db.put_result("r1", "p", "ref", {"evaluator": "a"}, {"win": 0.7}, "t1")
        second = db.put_result("r1", "p", "ref", {"evaluator": "a"}, {"win": 0.1}, "t2")
        assert first == second == {"win": 0.7}


def test_unknown_schema_versions_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    ResultStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99; this align-env reads version 1"):
        ResultStore(path)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE judgements (key TEXT, verdict REAL)")
    with pytest.raises(StoreError, match="SQLite file of something else"):
        ResultStore(foreign)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a results store"):
        ResultStore(junk)
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)


def test_cli_eval_writes_tables(trained_run, tiny_lm_dir, tmp_path, capsys):
    from align_env.cli import main

    out = tmp_path / "eval.md"
    code = main(["eval", str(trained_run), "--reference", f"initial?model={tiny_lm_dir}", "--evaluator", "rules",
                 "--max-items", "4", "--store", str(tmp_path / "r.sqlite"), "--out", str(out)])
    assert code == 0
    assert "win rate vs reference" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["policies"]
    assert main(["eval", str(trained_run), "--evaluator", "rules", "--max-items", "4", "--store",
                 str(tmp_path / "r.sqlite"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
