"""Judge quality, measured against a truth: does p_yes rank real matches first, are its verdicts right?

The judge's verdicts decide what training sees: a mined candidate judged "yes" becomes a
``false_negative`` (kept out of every softmax), one judged "no" a hard negative. Hoping the judge is
right is not enough; with a truth (``curation.truth``: the bundled example's, or a labelled sample)
``JudgeQuality`` measures it, per subset, over the judged pairs (those with a ``judge_p_yes``):

- ``auc``: ROC AUC of p_yes, pairs the truth calls a match vs pairs it calls no match (gold
  positives included: they are matches too). The chance that a random match gets a higher p_yes
  than a random non-match, ties counting half; it does not depend on where the verdict rule puts its
  threshold. ``None`` when one side is empty.
- ``fn_precision`` and ``fn_recall``: a "yes" on a candidate (a non-gold pair) is the judge's claim
  that the candidate is a false negative. Precision: the share of those claims the truth confirms;
  recall: the share of the candidates that really match (the real false negatives) the judge
  claimed. ``None`` when there is nothing to divide by.
- ``gold_agreement``: the share of judged gold positives the judge says "yes" to (no truth needed:
  gold is the reference here).
- counts behind each number, ``unknown`` (judged pairs a labelled sample does not cover, left out),
  and ``p_yes_hist``: bin counts of the candidates' p_yes, matches and non-matches apart (the
  report draws them beside the p_yes histograms).

``overall`` pools the counts of every subset (its precision, recall and agreement are over all
pairs), but its ``auc`` is the mean of the subsets' AUCs (MMEB averages subsets the same way): p_yes
is not comparable across subsets (a judge may score every vqa pair above every captions pair), and
a pooled AUC would mostly measure that. ``judge_dataset(..., truth=)`` (``assay judge --truth``) measures
every judged pair while it writes them, before ``keep_negatives`` trims any, and stores the result
in the manifest (``extra.judge.quality``); ``judge_quality(dataset, truth)`` measures a judged
dataset afterwards (the pairs it holds: a dataset judged with a keep limit holds only the kept
negatives, so measure during the run when that matters).

Example::

    from assay.curation.truth import read_truth
    quality = judge_quality("runs/quickstart/judged", read_truth("runs/quickstart/raw/truth/train.parquet"))
    quality["per_subset"]["captions"]["fn_recall"]
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from assay.curation.dataset import Dataset
from assay.curation.schema import NULL_KEY, PAIRS
from assay.curation.truth import Truth

HIST_BINS = 20
OVERALL = "(all)"


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive's score > a negative's), ties counting half: how well the score ranks, at any
    threshold (the Mann-Whitney U statistic over n_pos x n_neg). 0.0 when either side is empty."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if not pos.size or not neg.size:
        return 0.0
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties share their mean rank
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


class _Subset:
    """Running counts of one subset."""

    def __init__(self, bins: int):
        self.p = array("d")  # p_yes of the judged pairs the truth knows
        self.match = array("b")  # whether the truth calls each one a match
        self.unknown = 0
        self.positives = self.positives_yes = 0
        self.candidates = self.relevant = self.judged_yes = self.true_yes = 0
        self.hist = {"match": [0] * bins, "no_match": [0] * bins}

    def result(self) -> dict[str, Any]:
        p = np.frombuffer(self.p, dtype=np.float64)
        match = np.frombuffer(self.match, dtype=np.int8).astype(bool)
        both = match.any() and not match.all()
        return {
            "pairs": int(p.size),
            "unknown": self.unknown,
            "auc": roc_auc(p[match], p[~match]) if both else None,
            "positives": self.positives,
            "positives_yes": self.positives_yes,
            "gold_agreement": _share(self.positives_yes, self.positives),
            "candidates": self.candidates,
            "relevant_candidates": self.relevant,
            "judged_yes": self.judged_yes,
            "true_yes": self.true_yes,
            "fn_precision": _share(self.true_yes, self.judged_yes),
            "fn_recall": _share(self.true_yes, self.relevant),
            "p_yes_hist": self.hist,
        }


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class JudgeQuality:
    """Judged pairs in, quality per subset out (see the module docstring): ``add`` then ``result``."""

    def __init__(self, truth: Truth, bins: int = HIST_BINS):
        self.truth = truth
        self.bins = bins
        self.subsets: dict[str, _Subset] = {}

    def add(
        self,
        subsets: Iterable[str | None],
        query_ids: Iterable[str],
        doc_ids: Iterable[str],
        labels: Iterable[str | None],
        p_yes: Iterable[float | None],
        verdicts: Iterable[str | None],
    ) -> None:
        """Count judged pairs (a pair without p_yes, i.e. not judged or failed, is skipped)."""
        for subset, qid, did, label, p, verdict in zip(
            subsets, query_ids, doc_ids, labels, p_yes, verdicts, strict=True
        ):
            if p is None:
                continue
            acc = self.subsets.get(subset or "")
            if acc is None:
                acc = self.subsets[subset or ""] = _Subset(self.bins)
            yes = verdict == "yes"
            gold = label == "positive"
            if gold:
                acc.positives += 1
                acc.positives_yes += yes
            match = self.truth.relevant(qid, did)
            if match is None:
                acc.unknown += 1
                continue
            acc.p.append(float(p))
            acc.match.append(int(match))
            if gold:
                continue
            acc.candidates += 1
            acc.relevant += match
            acc.judged_yes += yes
            acc.true_yes += yes and match
            acc.hist["match" if match else "no_match"][min(int(p * self.bins), self.bins - 1)] += 1

    def result(self) -> dict[str, Any]:
        """``{"truth": ..., "per_subset": {subset: metrics}, "overall": metrics}``."""
        pooled = _Subset(self.bins)
        for acc in self.subsets.values():
            pooled.p.extend(acc.p)
            pooled.match.extend(acc.match)
            pooled.unknown += acc.unknown
            for name in ("positives", "positives_yes", "candidates", "relevant", "judged_yes", "true_yes"):
                setattr(pooled, name, getattr(pooled, name) + getattr(acc, name))
            for group, counts in acc.hist.items():
                pooled.hist[group] = [a + b for a, b in zip(pooled.hist[group], counts, strict=True)]
        per_subset = {s: self.subsets[s].result() for s in sorted(self.subsets)}
        overall = pooled.result()
        aucs = [q["auc"] for q in per_subset.values() if q["auc"] is not None]
        overall["auc"] = float(np.mean(aucs)) if aucs else None
        return {"truth": self.truth.describe(), "per_subset": per_subset, "overall": overall}


def judge_quality(dataset: str | Path | Dataset, truth: Truth, bins: int = HIST_BINS) -> dict[str, Any]:
    """The quality of the verdicts a judged dataset holds, against ``truth`` (see the module docstring)."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    subset_of = ds.query_subsets()
    quality = JudgeQuality(truth, bins)
    columns = ["query_id", "doc_id", "label", "judge_p_yes", "judge_verdict"]
    for batch in ds.iter_batches(PAIRS, columns=columns):
        cols = [batch.column(c).to_pylist() for c in columns]
        quality.add([subset_of.get(q, NULL_KEY) for q in cols[0]], *cols)
    return quality.result()
