"""Annotator evaluation (``align-env annotators``): score annotator specs on a track's labelled pairs.

Per (annotator, track): accuracy against the labels (ties and abstentions count half) with a seeded
bootstrap 95% CI, abstention rate, position consistency (same verdict in both orders, from the judge's
single-order verdicts when it exposes them, else from a second call with the order swapped),
P(prefers the longer response), and mean seconds and tokens per judgement. The template is AlpacaEval's
evaluator table. Each (annotator, track) result is written once to ``<out>/results/`` and reused on the
next call, so an interrupted evaluation resumes and a finished result is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from align_env.feedback import FeedbackCost, make_annotator, parse_spec
from align_env.models import parameter_count
from align_env.tracks import get_track
from leaderboards.stats import bootstrap_ci


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
    abstention: float
    position_consistency: float
    prefers_longer: float
    seconds_per_judgement: float
    tokens_per_judgement: float
    source: str = "embedded"
    seed: int = 0
    max_pairs: int | None = None

    def settings(self) -> tuple:
        return self.source, self.seed, self.max_pairs


def _unwrap(annotator):
    return getattr(annotator, "inner", annotator)


def evaluate(spec: str, track_name: str, *, source: str = "embedded", seed: int = 0,
             max_pairs: int | None = None) -> AnnotatorResult:
    track = get_track(track_name, source) if source == "embedded" else get_track(track_name, source,
                                                                                   max_items=max_pairs)
    pairs = list(track.pairs)[:max_pairs]
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
    details = getattr(_unwrap(annotator), "last_details", None)
    if getattr(_unwrap(annotator), "order_free", False):
        # scores each response on its own (likelihood, embedding, rules, reward model): the order cannot matter
        consistent = [True] * len(pairs)
    elif details and len(details) == len(pairs) and all(d.get("p_ba") is not None for d in details):
        consistent = [(d["p_ab"] > 0.5) == (d["p_ba"] < 0.5) for d in details]
    else:
        reverse = annotator.pairwise(items, b, a)
        consistent = [v is not None and r is not None and (v > 0.5) == (r < 0.5) or (v == r == 0.5)
                      for v, r in zip(verdicts, reverse)]
    correct, longer = [], []
    for v, s, x, y in zip(verdicts, swap, a, b):
        if v is None or v == 0.5:
            correct.append(0.5)
            continue
        picks_a = v > 0.5
        correct.append(float(picks_a != bool(s)))  # chosen is b when swapped
        if len(x) != len(y):
            longer.append(float((len(x) > len(y)) == picks_a))
    lo, hi = bootstrap_ci(correct, seed=seed)
    model = parsed.model or ""
    return AnnotatorResult(
        annotator=spec, family=parsed.family, model=model or "-", params=parameter_count(model) or 0 if model else 0,
        track=track.id, pairs=len(pairs), accuracy=float(np.mean(correct)), ci_low=lo, ci_high=hi,
        abstention=sum(v is None for v in verdicts) / len(pairs), position_consistency=float(np.mean(consistent)),
        prefers_longer=float(np.mean(longer)) if longer else float("nan"),
        seconds_per_judgement=seconds / len(pairs), tokens_per_judgement=cost.tokens_in / len(pairs),
        source=source, seed=seed, max_pairs=max_pairs,
    )


def _result_path(out: Path, spec: str, track: str, source: str, seed: int, max_pairs) -> Path:
    key = hashlib.sha256(json.dumps([spec, track, source, seed, max_pairs]).encode()).hexdigest()[:16]
    return out / "results" / f"{track}-{key}.json"


def run(specs: list[str], tracks: list[str], out: Path, *, source: str = "embedded", seed: int = 0,
        max_pairs: int | None = None, progress=print) -> list[AnnotatorResult]:
    """Evaluate every spec on every track, reusing finished results; write CSV, JSON, Markdown and a plot."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for track in tracks:
        for spec in specs:
            path = _result_path(out, spec, track, source, seed, max_pairs)
            if path.exists():
                results.append(AnnotatorResult(**json.loads(path.read_text())))
                progress(f"{track:<10} {spec:<40} (kept from {path.name})")
                continue
            res = evaluate(spec, track, source=source, seed=seed, max_pairs=max_pairs)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=1))
            os.replace(tmp, path)
            results.append(res)
            progress(f"{track:<10} {spec:<40} acc {res.accuracy:.3f} [{res.ci_low:.2f}, {res.ci_high:.2f}] "
                     f"{res.seconds_per_judgement:.3f}s/pair")
    write_outputs(collected(out, (source, seed, max_pairs), first=results), out)
    return results


def collected(out: Path, settings: tuple, first: list[AnnotatorResult] = ()) -> list[AnnotatorResult]:
    """This run's results, then every other finished result in ``out`` made with the same settings
    (source, seed, max_pairs): a folder accumulates, so a track-specific spec can be run on its own."""
    rows, seen = list(first), {(r.annotator, r.track) for r in first}
    for path in sorted((out / "results").glob("*.json")):
        res = AnnotatorResult(**json.loads(path.read_text()))
        if res.settings() == settings and (res.annotator, res.track) not in seen:
            rows.append(res)
            seen.add((res.annotator, res.track))
    return rows


def write_outputs(results: list[AnnotatorResult], out: Path) -> None:
    rows = [asdict(r) for r in results]
    with open(out / "annotators.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "annotators.json").write_text(json.dumps(rows, indent=1))
    (out / "annotators.md").write_text(markdown_table(results))
    plot(results, out / "annotators.png")


def markdown_table(results: list[AnnotatorResult]) -> str:
    head = ("| track | annotator | params | accuracy [95% CI] | abstain | position consistency | P(longer) "
            "| s/judgement | tokens/judgement |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in sorted(results, key=lambda r: (r.track, -r.accuracy)):
        params = f"{r.params / 1e6:.0f}M" if r.params else "-"
        lines.append(f"| {r.track} | `{r.annotator}` | {params} | {r.accuracy:.3f} [{r.ci_low:.2f}, {r.ci_high:.2f}] "
                     f"| {r.abstention:.2f} | {r.position_consistency:.2f} | {r.prefers_longer:.2f} "
                     f"| {r.seconds_per_judgement:.3f} | {r.tokens_per_judgement:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(results: list[AnnotatorResult], path: Path) -> None:
    """Accuracy against annotator size (parameters), one line per family and options, one panel per track."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = sorted({r.track for r in results})
    fig, axes = plt.subplots(1, len(tracks), figsize=(5 * len(tracks), 4), squeeze=False, sharey=True)
    for ax, track in zip(axes[0], tracks):
        rows = [r for r in results if r.track == track]
        # one line per annotator kind (the spec without its model: family and options), across model sizes
        kinds = sorted({r.annotator.split(":", 1)[-1] for r in rows if r.params})
        for kind in kinds:
            sized = sorted((r for r in rows if r.params and r.annotator.split(":", 1)[-1] == kind),
                           key=lambda r: r.params)
            err = [[r.accuracy - r.ci_low for r in sized], [r.ci_high - r.accuracy for r in sized]]
            ax.errorbar([r.params for r in sized], [r.accuracy for r in sized], yerr=err, marker="o", capsize=3,
                        label=kind[:40])
        for r in rows:
            if not r.params:
                ax.axhline(r.accuracy, linestyle="--", linewidth=1, label=f"{r.annotator} (no model)")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(track)
        ax.set_xlabel("annotator parameters")
        ax.set_ylim(0.2, 1.0)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy on labelled pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
