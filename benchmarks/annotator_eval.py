"""Annotator evaluation (``align-env annotators``): score annotator specs on a track's labelled pairs.

Every labelled pair of the track is judged once (the chosen response shown first for a seeded half). The pairs
are split into two fixed halves (:func:`align_env.tracks.track.pair_halves`): the **selection** half, on which
annotators are compared and the recommended one is chosen, and the **report** half, whose accuracy is the figure
quoted for the chosen annotator (choosing the best of several on the same pairs it is reported on biases the
figure upwards). Per (annotator, track):

* accuracy against the labels (ties and abstentions count half) on all pairs and on each half, with seeded
  percentile bootstrap 95% CIs;
* abstention rate; P(prefers the longer response);
* position consistency: the same verdict in both orders, from the judge's single-order verdicts when it exposes
  them, else from a second call with the order swapped; 1 for families that score each response on its own;
* for prompted judges that expose their label log-odds (``llm_judge``): the order prior, the position
  consistency after removing it, and the accuracy of a single-order verdict with the prior removed, on the
  report half. The prior is the content-free estimate when the spec asks for ``calibrate=content_free``, else
  the mean of (l_AB + l_BA) / 2 over the selection half (estimated on one half, applied to the other);
* mean seconds and tokens per judgement.

The template is AlpacaEval's evaluator table. Each (annotator, track) result, with its per-pair verdicts, is
written once to ``<out>/results/`` and reused on the next call, so an interrupted evaluation resumes and a
finished result is never overwritten. Annotators that read the items' labels (``rules?oracle=true``) are marked
``oracle`` and never recommended.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from align_env.feedback import FeedbackCost, make_annotator, parse_spec
from align_env.models import parameter_count
from align_env.tracks import get_track
from align_env.tracks.track import pair_halves
from leaderboards.stats import bootstrap_ci

RESULT_FORMAT = 2  # results of another format (e.g. the 40-pair tables of format 1) are not reused
NAN = float("nan")


@dataclass
class AnnotatorResult:
    annotator: str
    family: str
    model: str
    params: int
    track: str
    pairs: int
    accuracy: float
    ci_low: float
    ci_high: float
    selection_pairs: int
    selection_accuracy: float
    selection_ci_low: float
    selection_ci_high: float
    report_pairs: int
    report_accuracy: float
    report_ci_low: float
    report_ci_high: float
    abstention: float
    position_consistency: float
    prefers_longer: float
    seconds_per_judgement: float
    tokens_per_judgement: float
    order_prior: float = NAN  # log-odds of "A" the judge gives with no content (NaN: not a prompted judge)
    calibrated_consistency: float = NAN  # position consistency after removing the order prior
    single_order_accuracy: float = NAN  # report half, one order per pair, prior removed
    oracle: bool = False  # reads the items' gold labels: an ablation, never recommended
    source: str = "embedded"
    seed: int = 0
    max_pairs: int | None = None
    format: int = RESULT_FORMAT
    derived_from: str = ""  # the measured spec whose per-pair probabilities gave this result (see derive_uncalibrated)
    details: list = field(default_factory=list, repr=False)  # per pair: id, half, swapped, verdict, judge details

    def settings(self) -> tuple:
        return self.source, self.seed, self.max_pairs

    def row(self) -> dict:
        """The table row (everything but the per-pair details)."""
        return {k: v for k, v in asdict(self).items() if k != "details"}


def _unwrap(annotator):
    return getattr(annotator, "inner", annotator)


def reads_labels(spec: str) -> bool:
    """True for annotator specs that read item labels (oracle modes)."""
    parsed = parse_spec(spec)
    members = str(parsed.params.get("members", "")).split("|") if parsed.family == "pool" else []
    return parsed.params.get("oracle") is True or any(reads_labels(m) for m in members if m.strip())


def _correct(verdict, swapped: bool) -> float:
    """1 when the verdict picks the chosen response, 0 when it picks the rejected one, 0.5 for ties/abstentions."""
    if verdict is None or verdict == 0.5 or not math.isfinite(verdict):
        return 0.5
    return float((verdict > 0.5) != swapped)  # the chosen response is b when swapped


def _accuracy(values: list[float], seed: int) -> tuple[float, float, float]:
    if not values:
        return NAN, NAN, NAN
    lo, hi = bootstrap_ci(values, seed=seed)
    return float(np.mean(values)), lo, hi


def _prior_from_orders(details: list[dict]) -> float:
    """Order prior from the two orders: the mean of (l_AB + l_BA) / 2 over the given pairs (the content term
    changes sign with the order, the prior does not)."""
    both = [(d["l_ab"] + d["l_ba"]) / 2 for d in details if d.get("l_ab") is not None and d.get("l_ba") is not None]
    return float(np.mean(both)) if both else NAN


def _calibration(rows: list[dict], seed: int) -> tuple[float, float, float]:
    """(prior, consistency after removing it, single-order accuracy on the report half)."""
    judged = [r for r in rows if r["judge"].get("l_ab") is not None and r["judge"].get("l_ba") is not None]
    if not judged:
        return NAN, NAN, NAN
    prior = judged[0]["judge"].get("prior")
    if prior is None:
        prior = _prior_from_orders([r["judge"] for r in judged if r["half"] == "selection"])
    if not math.isfinite(prior):
        return NAN, NAN, NAN
    report = [r for r in judged if r["half"] == "report"] or judged
    consistent = [float((r["judge"]["l_ab"] - prior > 0) == (r["judge"]["l_ba"] - prior < 0)) for r in report]
    single = [_correct(1.0 / (1.0 + math.exp(-max(-50, min(50, r["judge"]["l_ab"] - prior)))), r["swapped"])
              for r in report]
    return float(prior), float(np.mean(consistent)), float(np.mean(single))


def evaluate(spec: str, track_name: str, *, source: str = "embedded", seed: int = 0,
             max_pairs: int | None = None) -> AnnotatorResult:
    track = get_track(track_name, source) if source == "embedded" else get_track(track_name, source,
                                                                                   max_items=max_pairs)
    pairs = list(track.pairs)[:max_pairs]
    selection_ids = {p.id for p in pair_halves(tuple(pairs))[0]}
    parsed = parse_spec(spec)
    if parsed.family not in ("rules", "pool", "self"):  # measure the annotator itself, not a cache
        parsed = type(parsed)(parsed.family, parsed.model, parsed.params | {"cache": "off"})
    annotator = make_annotator(parsed, track=track_name)
    rng = np.random.default_rng(seed)
    swap = rng.random(len(pairs)) < 0.5  # the chosen response is shown first for about half the pairs
    items = [p.item for p in pairs]
    a = [p.rejected if s else p.chosen for p, s in zip(pairs, swap)]
    b = [p.chosen if s else p.rejected for p, s in zip(pairs, swap)]
    before = getattr(annotator, "cost", FeedbackCost()).copy()
    start = time.perf_counter()
    verdicts = annotator.pairwise(items, a, b)
    seconds = time.perf_counter() - start
    cost = getattr(annotator, "cost", FeedbackCost()) - before
    judge = _unwrap(annotator)
    details = getattr(judge, "last_details", None)
    if not (details and len(details) == len(pairs)):
        details = [{} for _ in pairs]
    if getattr(judge, "order_free", False):
        # scores each response on its own (likelihood, embedding, rules, reward model): the order cannot matter
        consistent = [True] * len(pairs)
    elif all(d.get("p_ba") is not None for d in details):
        consistent = [(d["p_ab"] > 0.5) == (d["p_ba"] < 0.5) for d in details]
    else:
        reverse = annotator.pairwise(items, b, a)
        consistent = [v is not None and r is not None and (v > 0.5) == (r < 0.5) or (v == r == 0.5)
                      for v, r in zip(verdicts, reverse)]
    rows = [{"id": p.id, "half": "selection" if p.id in selection_ids else "report", "swapped": bool(s),
             "verdict": v, "judge": d} for p, s, v, d in zip(pairs, swap, verdicts, details)]
    correct = [_correct(v, bool(s)) for v, s in zip(verdicts, swap)]
    longer = [float((len(x) > len(y)) == (v > 0.5)) for v, x, y in zip(verdicts, a, b)
              if v is not None and v != 0.5 and len(x) != len(y)]
    halves = {h: [c for c, r in zip(correct, rows) if r["half"] == h] for h in ("selection", "report")}
    acc, sel, rep = _accuracy(correct, seed), _accuracy(halves["selection"], seed), _accuracy(halves["report"], seed)
    prior, calibrated, single = _calibration(rows, seed)
    model = parsed.model or ""
    return AnnotatorResult(
        annotator=spec, family=parsed.family, model=model or "-", params=(parameter_count(model) or 0) if model else 0,
        track=track.id, pairs=len(pairs), accuracy=acc[0], ci_low=acc[1], ci_high=acc[2],
        selection_pairs=len(halves["selection"]), selection_accuracy=sel[0], selection_ci_low=sel[1],
        selection_ci_high=sel[2], report_pairs=len(halves["report"]), report_accuracy=rep[0], report_ci_low=rep[1],
        report_ci_high=rep[2], abstention=sum(v is None for v in verdicts) / len(pairs),
        position_consistency=float(np.mean(consistent)), prefers_longer=float(np.mean(longer)) if longer else NAN,
        seconds_per_judgement=seconds / len(pairs), tokens_per_judgement=cost.tokens_in / len(pairs),
        order_prior=prior, calibrated_consistency=calibrated, single_order_accuracy=single,
        oracle=reads_labels(spec), source=source, seed=seed, max_pairs=max_pairs, details=rows,
    )


def uncalibrated_spec(spec: str) -> str | None:
    """The same judge without ``calibrate=content_free``, or None when ``spec`` is not a calibrated llm_judge."""
    head, _, query = spec.partition("?")
    parts = [q for q in query.split("&") if q]
    if parse_spec(spec).family != "llm_judge" or "calibrate=content_free" not in parts:
        return None
    rest = [q for q in parts if q != "calibrate=content_free"]
    return head + ("?" + "&".join(rest) if rest else "")


def derive_uncalibrated(res: AnnotatorResult) -> AnnotatorResult | None:
    """The uncalibrated judge's result, computed from a calibrated judge's stored per-order probabilities.

    Both judges make the same two forward passes per pair (one per order) and differ only in how they combine
    them: the plain judge averages the probabilities, P = (p_AB + 1 - p_BA) / 2, the calibrated one the log-odds.
    So the plain judge's verdicts follow exactly from the calibrated run's ``p_ab``/``p_ba`` (a test checks this
    against a measured run); the ladder uses it for the largest model instead of running the judge twice. The
    cost columns are the calibrated run's (plus its few content-free queries). ``derived_from`` names the source.
    """
    spec = uncalibrated_spec(res.annotator)
    rows = res.details
    if spec is None or not rows or any(r["judge"].get("p_ab") is None and r["verdict"] is not None for r in rows):
        return None
    verdicts = []
    for r in rows:
        j = r["judge"]
        ok = j.get("p_ab") is not None and j.get("p_ba") is not None
        verdicts.append((j["p_ab"] + 1.0 - j["p_ba"]) / 2.0 if ok else None)
    new_rows = [r | {"verdict": v, "judge": {k: val for k, val in r["judge"].items() if k != "prior"} | {"prior": None}}
                for r, v in zip(rows, verdicts)]
    correct = [_correct(v, r["swapped"]) for v, r in zip(verdicts, rows)]
    halves = {h: [c for c, r in zip(correct, rows) if r["half"] == h] for h in ("selection", "report")}
    acc, sel, rep = (_accuracy(correct, res.seed), _accuracy(halves["selection"], res.seed),
                     _accuracy(halves["report"], res.seed))
    prior, calibrated, single = _calibration(new_rows, res.seed)
    # P(prefers longer) needs the response lengths: flip it where a verdict changed side (rare: only where the
    # probability and log-odds averages disagree); recomputed exactly in evaluate() for measured results.
    changed = sum((v is not None and r["verdict"] is not None and (v > 0.5) != (r["verdict"] > 0.5))
                  for v, r in zip(verdicts, rows))
    return AnnotatorResult(
        **{f.name: getattr(res, f.name) for f in fields(AnnotatorResult)} | dict(
            annotator=spec, accuracy=acc[0], ci_low=acc[1], ci_high=acc[2], selection_accuracy=sel[0],
            selection_ci_low=sel[1], selection_ci_high=sel[2], report_accuracy=rep[0], report_ci_low=rep[1],
            report_ci_high=rep[2], abstention=sum(v is None for v in verdicts) / len(rows),
            prefers_longer=res.prefers_longer if changed == 0 else NAN, order_prior=prior,
            calibrated_consistency=calibrated, single_order_accuracy=single, derived_from=res.annotator,
            details=new_rows))


def _result_path(out: Path, spec: str, track: str, source: str, seed: int, max_pairs) -> Path:
    key = hashlib.sha256(json.dumps([spec, track, source, seed, max_pairs, RESULT_FORMAT]).encode()).hexdigest()[:16]
    return out / "results" / f"{track}-{key}.json"


def load_result(path: Path) -> AnnotatorResult | None:
    """A stored result, or None when it is of another format (or not a result)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        return None
    known = {f.name for f in fields(AnnotatorResult)}
    return AnnotatorResult(**{k: v for k, v in data.items() if k in known})


def run(specs: list[str], tracks: list[str], out: Path, *, source: str = "embedded", seed: int = 0,
        max_pairs: int | None = None, progress=print) -> list[AnnotatorResult]:
    """Evaluate every spec on every track, reusing finished results; write CSV, JSON, Markdown and a plot."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for track in tracks:
        for spec in specs:
            path = _result_path(out, spec, track, source, seed, max_pairs)
            if path.exists() and (kept := load_result(path)) is not None:
                results.append(kept)
                progress(f"{track:<10} {spec:<40} (kept from {path.name})")
                continue
            res = evaluate(spec, track, source=source, seed=seed, max_pairs=max_pairs)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=1))
            os.replace(tmp, path)
            results.append(res)
            progress(f"{track:<10} {spec:<40} selection {res.selection_accuracy:.3f} report {res.report_accuracy:.3f} "
                     f"[{res.report_ci_low:.2f}, {res.report_ci_high:.2f}] {res.seconds_per_judgement:.3f}s/pair")
    write_outputs(collected(out, (source, seed, max_pairs), first=results), out)
    return results


def derived_results(results: list[AnnotatorResult]) -> list[AnnotatorResult]:
    """Uncalibrated judges derived from calibrated ones, where the uncalibrated spec was not measured itself."""
    have = {(r.annotator, r.track) for r in results}
    out = []
    for r in results:
        spec = uncalibrated_spec(r.annotator)
        if spec and (spec, r.track) not in have and (d := derive_uncalibrated(r)) is not None:
            out.append(d)
            have.add((spec, r.track))
    return out


def collected(out: Path, settings: tuple, first: list[AnnotatorResult] = ()) -> list[AnnotatorResult]:
    """This run's results, then every other finished result in ``out`` made with the same settings
    (source, seed, max_pairs): a folder accumulates, so a track-specific spec can be run on its own. Uncalibrated
    judges derivable from a calibrated one's stored probabilities are added when not measured themselves."""
    rows, seen = list(first), {(r.annotator, r.track) for r in first}
    for path in sorted((out / "results").glob("*.json")):
        res = load_result(path)
        if res is not None and res.settings() == settings and (res.annotator, res.track) not in seen:
            rows.append(res)
            seen.add((res.annotator, res.track))
    return rows + derived_results(rows)


def ranking(results: list[AnnotatorResult], track: str) -> list[AnnotatorResult]:
    """A track's annotators best first by selection-half accuracy (ties: the cheaper first); oracles left out."""
    rows = [r for r in results if r.track.split("@")[0].rsplit("-v", 1)[0] == track and not r.oracle]
    return sorted(rows, key=lambda r: (-r.selection_accuracy, r.seconds_per_judgement, r.annotator))


def recommend(results: list[AnnotatorResult]) -> dict[str, AnnotatorResult]:
    """Per track, the annotator chosen on the selection half (its report-half accuracy is the honest figure)."""
    tracks = sorted({r.track.split("@")[0].rsplit("-v", 1)[0] for r in results})
    return {t: ranked[0] for t in tracks if (ranked := ranking(results, t))}


def ranking_table(results: list[AnnotatorResult]) -> dict[str, list[dict]]:
    """What ``align_env/feedback/ranking.json`` holds: per track, the non-oracle annotators best first."""
    tracks = sorted({r.track.split("@")[0].rsplit("-v", 1)[0] for r in results})
    keys = ("annotator", "params", "selection_accuracy", "report_accuracy", "report_ci_low", "report_ci_high",
            "report_pairs", "seconds_per_judgement")
    return {t: [{k: getattr(r, k) for k in keys} for r in ranking(results, t)] for t in tracks}


def write_outputs(results: list[AnnotatorResult], out: Path) -> None:
    rows = [r.row() for r in results]
    with open(out / "annotators.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "annotators.json").write_text(json.dumps(rows, indent=1))
    (out / "annotators.md").write_text(markdown_table(results))
    plot(results, out / "annotators.png")


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(results: list[AnnotatorResult]) -> str:
    """One row per (track, annotator), best selection accuracy first; the recommended one in bold."""
    best = {r.track: r.annotator for r in recommend(results).values()}
    head = ("| track | annotator | params | selection acc | report acc [95% CI] | abstain | position consistency "
            "(after prior removed) | 1-order acc, prior removed | P(longer) | s/judgement | tokens/judgement |\n"
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in sorted(results, key=lambda r: (r.track, -r.selection_accuracy, r.seconds_per_judgement)):
        params = f"{r.params / 1e6:.0f}M" if r.params else "-"
        name = f"`{r.annotator}`" + (" (oracle: reads labels)" if r.oracle else "")
        if r.derived_from:
            name += " (from the calibrated run's per-order probabilities)"
        if best.get(r.track) == r.annotator:
            name = f"**{name}**"
        after = f" ({_f(r.calibrated_consistency)})" if not math.isnan(r.calibrated_consistency) else ""
        lines.append(f"| {r.track} | {name} | {params} | {_f(r.selection_accuracy, 3)} | {_f(r.report_accuracy, 3)} "
                     f"[{_f(r.report_ci_low)}, {_f(r.report_ci_high)}] | {_f(r.abstention)} | "
                     f"{_f(r.position_consistency)}{after} | {_f(r.single_order_accuracy, 3)} | {_f(r.prefers_longer)} "
                     f"| {_f(r.seconds_per_judgement, 3)} | {r.tokens_per_judgement:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(results: list[AnnotatorResult], path: Path) -> None:
    """Report-half accuracy against annotator size (parameters), one line per family and options, a panel per track."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = sorted({r.track for r in results})
    fig, axes = plt.subplots(1, len(tracks), figsize=(5.5 * len(tracks), 4.5), squeeze=False, sharey=True)
    for ax, track in zip(axes[0], tracks):
        rows = [r for r in results if r.track == track and not r.oracle]
        # one line per annotator kind (the spec without its model: family and options), across model sizes
        kinds = sorted({r.annotator.split(":", 1)[-1] for r in rows if r.params})
        for kind in kinds:
            sized = sorted((r for r in rows if r.params and r.annotator.split(":", 1)[-1] == kind),
                           key=lambda r: r.params)
            err = [[r.report_accuracy - r.report_ci_low for r in sized], [r.report_ci_high - r.report_accuracy
                                                                         for r in sized]]
            ax.errorbar([r.params for r in sized], [r.report_accuracy for r in sized], yerr=err, marker="o",
                        capsize=3, label=kind[:40])
        for r in rows:
            if not r.params:
                ax.axhline(r.report_accuracy, linestyle="--", linewidth=1, label=f"{r.annotator[:40]} (no model)")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(track)
        ax.set_xlabel("annotator parameters")
        ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("accuracy on the report half of the labelled pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
