"""A judge for tests: deterministic margins from the rendered prompt, no model."""

from __future__ import annotations

import hashlib

from assay.curation.judge.scoring import Score


class FakeJudge:
    """Deterministic margins from the rendered prompt; counts what it was asked, fails where told."""

    def __init__(self, model_id: str = "fake@0", fail_on: str | None = None):
        self.model_id = model_id
        self.calls: list[str] = []
        self.fail_on = fail_on

    def score(self, items):
        out = []
        for it in items:
            text = "".join(p.get("text", "") for p in it.parts)
            self.calls.append(text)
            if self.fail_on and self.fail_on in text:
                out.append(Score(error="simulated timeout"))
            elif "<<<green>>>" in text:
                out.append(Score(margin=3.0))
            else:
                h = int(hashlib.sha1(text.encode()).hexdigest()[:6], 16)
                out.append(Score(margin=-1.0 - (h % 100) / 50))
        return out
