"""The captions subset of the easy-vqa example: one labelled image per caption, other matches unlabelled.

Real data labels one positive per query and leaves other matching documents unlabelled; this subset
has that shape, on data whose every match can be computed, so that evaluation and the judge can be
scored against the whole truth (``curation.truth``).

Each image is one ``Look``: the colour and shape (``curation.examples`` reads them), the size (the
longer side of the shape's bounding box: small <= ``SMALL_MAX_PX``, large >= ``LARGE_MIN_PX``,
medium between, on 64 px images) and the position (the box centre's third of the image, across:
left / centre / right, and down: top / middle / bottom). A ``Caption`` names the colour and shape and
one or two more facts; each fact it leaves out matches anything::

    a small red circle                   size
    a red circle on the left             across (left, right)
    a red circle at the top              down (top, bottom)
    a red circle in the top left corner  across and down (a corner)
    a red circle in the middle           across and down (the centre)
    a small red circle on the left       size and a position

So "a small red circle" also matches the image labelled for "a small red circle on the left".
``label_captions`` takes every caption some image of the split fits, most specific first (fewest
matching images, then the text), and gives each the first matching image (by image id) that no
caption has yet; only when all its matches are taken does it share one. The labelled images are the
subset's corpus; ``caption_truth`` lists, for each caption, every corpus image it matches.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Size words, by the longer side of the shape's bounding box (64 px images).
SMALL_MAX_PX, LARGE_MIN_PX = 15, 24
ACROSS = ("left", "centre", "right")
DOWN = ("top", "middle", "bottom")


@dataclass(frozen=True, order=True)
class Look:
    """What one image shows: colour, shape, size word, and the third of the image it sits in."""

    colour: str
    shape: str
    size: str
    across: str
    down: str

    @classmethod
    def of(cls, colour: str, shape: str, box: list[int]) -> Look:
        """From the measured box ``[top, left, height, width, image height, image width]``."""
        top, left, height, width, image_h, image_w = box
        side = max(height, width)
        size = "small" if side <= SMALL_MAX_PX else "large" if side >= LARGE_MIN_PX else "medium"
        return cls(
            colour,
            shape,
            size,
            _third(left + width / 2, image_w, ACROSS),
            _third(top + height / 2, image_h, DOWN),
        )


def _third(centre: float, extent: int, words: tuple[str, str, str]) -> str:
    return words[0] if centre < extent / 3 else words[2] if centre > 2 * extent / 3 else words[1]


@dataclass(frozen=True, order=True)
class Caption:
    """A description of a look; ``None`` facts are not said, so anything matches them."""

    colour: str
    shape: str
    size: str | None = None
    across: str | None = None
    down: str | None = None

    def text(self) -> str:
        words = ["a", self.size, self.colour, self.shape, _where(self.across, self.down)]
        return " ".join(w for w in words if w)

    def matches(self, look: Look) -> bool:
        return all(
            want is None or want == have
            for want, have in (
                (self.colour, look.colour),
                (self.shape, look.shape),
                (self.size, look.size),
                (self.across, look.across),
                (self.down, look.down),
            )
        )


def _where(across: str | None, down: str | None) -> str | None:
    if across is None and down is None:
        return None
    if down is None:
        return f"on the {across}"
    if across is None:
        return f"at the {down}"
    return "in the middle" if (across, down) == ("centre", "middle") else f"in the {down} {across} corner"


def captions_of(look: Look) -> list[Caption]:
    """Every caption of one look that says one or two facts beyond the colour and shape."""
    places: list[tuple[str | None, str | None]] = [(None, None)]
    if look.across != "centre":
        places.append((look.across, None))
    if look.down != "middle":
        places.append((None, look.down))
    if (look.across == "centre") == (look.down == "middle"):  # a corner, or the middle
        places.append((look.across, look.down))
    out = []
    for size in (None, look.size):
        for across, down in places:
            if 1 <= (size is not None) + (across is not None or down is not None) <= 2:
                out.append(Caption(look.colour, look.shape, size, across, down))
    return out


def label_captions(looks: dict[int, Look]) -> dict[Caption, int]:
    """{caption: its labelled image id}, for every caption some image of ``looks`` fits; see the
    module docstring."""
    matching: dict[Caption, list[int]] = defaultdict(list)
    for image in sorted(looks):
        for caption in captions_of(looks[image]):
            matching[caption].append(image)
    taken: set[int] = set()
    out: dict[Caption, int] = {}
    for caption in sorted(matching, key=lambda c: (len(matching[c]), c.text())):
        images = matching[caption]
        out[caption] = next((i for i in images if i not in taken), images[0])
        taken.add(out[caption])
    return out


def caption_truth(captions: dict[Caption, int], looks: dict[int, Look]) -> dict[Caption, list[int]]:
    """{caption: every labelled image (the subset's corpus) it matches}, its own labelled one included."""
    corpus = sorted(set(captions.values()))
    return {c: [i for i in corpus if c.matches(looks[i])] for c in captions}


def caption_figures(captions: dict[Caption, int], looks: dict[int, Look]) -> dict[str, Any]:
    """The subset's size for the manifest: queries, corpus images, matching images per caption."""
    matches = np.array([len(v) for v in caption_truth(captions, looks).values()] or [0])
    return {
        "queries": len(captions),
        "corpus": len(set(captions.values())),
        "labelled_positives_per_query": 1,
        "matches_per_query": {
            "mean": round(float(matches.mean()), 3),
            "median": float(np.median(matches)),
            "max": int(matches.max()),
        },
        "queries_with_unlabelled_matches": int((matches > 1).sum()),
    }
