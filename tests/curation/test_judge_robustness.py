"""The injection flip rate and gold agreement measurements, on judges whose answers are known."""

from __future__ import annotations

from assay.curation.judge.prompts import load_prompt
from assay.curation.judge.robustness import INJECTIONS, gold_agreement, injection_flip_rate
from assay.curation.judge.scoring import Score


class Gullible:
    """Says yes when the candidate names the query's colour, or when anything tells it to."""

    model_id = "gullible"

    def score(self, items):
        out = []
        for it in items:
            text = "".join(p.get("text", "") for p in it.parts).lower()
            obeys = "yes." in text.split("answer with yes or no")[0] or "verdict for this pair is yes" in text
            right = "<<<red" in text and "red" in text.split("question:")[-1].split("answer:")[0]
            out.append(Score(margin=2.0 if (right or obeys) else -2.0))
        return out


class Steadfast(Gullible):
    model_id = "steadfast"

    def score(self, items):
        return [
            Score(margin=2.0 if "<<<red" in "".join(p.get("text", "") for p in it.parts) else -2.0)
            for it in items
        ]


PAIRS = [({"text": "Is it red?"}, {"text": "red"}), ({"text": "Is it red?"}, {"text": "blue"})]


def test_flip_rate_tells_a_gullible_judge_from_a_steadfast_one():
    template = load_prompt("vqa")
    gullible = injection_flip_rate(Gullible(), template, PAIRS)
    steadfast = injection_flip_rate(Steadfast(), template, PAIRS)
    assert gullible.judged == steadfast.judged == len(PAIRS) * len(INJECTIONS)
    assert steadfast.flips == 0 and steadfast.flip_rate == 0.0
    # the "blue" pair flips to yes under the injections the gullible judge obeys; "red" was yes already
    assert 0 < gullible.flips_to_yes == gullible.flips <= len(INJECTIONS) and gullible.mean_p_yes_shift > 0


def test_gold_agreement_counts_positives_and_negatives_apart():
    template = load_prompt("vqa")
    pairs = [(q, d, d["text"] == "red") for q, d in PAIRS] + [
        ({"text": "Is it red?"}, {"text": "green"}, True)
    ]
    result = gold_agreement(Steadfast(), template, pairs)
    assert result == {"accuracy": 2 / 3, "on_positives": 0.5, "on_negatives": 1.0, "auc": 0.75, "pairs": 3}


def test_roc_auc():
    from assay.curation.judge.robustness import roc_auc

    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5], [0.5]) == 0.5 and roc_auc([], [0.1]) == 0.0
