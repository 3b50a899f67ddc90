"""What every judge backend takes and gives back, and the arithmetic they share.

A backend (in process with transformers, vLLM engines, an OpenAI-compatible endpoint, or an assay
reranker handed over by ``pipelines``) is anything with a ``model_id`` and a ``score`` method:

    scorer.score([JudgeItem, ...]) -> [Score, ...]     # same length, same order

A :class:`JudgeItem` is one rendered judge prompt: the content parts of one user chat message (see
:func:`curation.judge.prompts.render`), the images its image parts stand for, and the two label words.
A :class:`Score` holds ``margin`` = logit(yes) - logit(no), read from ONE forward pass at the answer
position (no sampling, no softmax over the vocabulary), and ``p_yes = e^yes / (e^yes + e^no)`` =
sigmoid(margin). A log-probability normalised over any set of tokens that holds both labels gives
the same margin, so backends that only report log-probabilities agree with those that read logits.

A pair that cannot be scored gets ``Score(error=...)``; backends never raise for one bad pair.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from assay.curation import storage


@dataclass(frozen=True)
class JudgeItem:
    """One judge prompt: ``parts`` of a user message, its ``images`` in order, the two label words."""

    parts: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    labels: tuple[str, str] = ("yes", "no")

    def __post_init__(self) -> None:
        n_image_parts = sum(p.get("type") == "image" for p in self.parts)
        if n_image_parts != len(self.images):
            raise ValueError(f"{n_image_parts} image parts but {len(self.images)} images")


@dataclass(frozen=True)
class Score:
    """A judgment's numbers, or why there are none."""

    margin: float | None = None  # logit(yes) - logit(no)
    error: str | None = None

    @property
    def p_yes(self) -> float | None:
        return None if self.margin is None else p_yes_from_margin(self.margin)

    @property
    def ok(self) -> bool:
        return self.error is None and self.margin is not None


@runtime_checkable
class Scorer(Protocol):
    """A judge backend. ``model_id`` names the model and its weights (part of the cache key)."""

    model_id: str

    def score(self, items: Sequence[JudgeItem]) -> list[Score]: ...


def p_yes_from_margin(margin: float) -> float:
    """sigmoid(margin), stable for any float (e^yes / (e^yes + e^no) with margin = yes - no)."""
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    e = math.exp(margin)
    return e / (1.0 + e)


def checked_score(logit_yes: float, logit_no: float) -> Score:
    """A Score from two label logits (or log-probabilities); an error Score when either is not finite."""
    if not (math.isfinite(logit_yes) and math.isfinite(logit_no)):
        return Score(error=f"non-finite label logits (yes={logit_yes}, no={logit_no})")
    return Score(margin=float(logit_yes) - float(logit_no))


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> tuple[int, int]:
    """The token of each label word as the model writes it right after the generation prompt.

    The answer opens the assistant turn, so the word is tokenised as written, without a leading
    space. A label must be a single token of the vocabulary: a word that splits into pieces is refused
    (its first piece would be scored, which is a different question). The two must differ. Case
    matters ("Yes" and "yes" are different tokens); the template's ``labels`` say which to read.
    """
    ids = []
    for word in labels:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(
                f"label {word!r} is {len(toks)} tokens for this tokenizer ({toks}); a judge label "
                "must be one token: choose other labels in the prompt template"
            )
        ids.append(int(toks[0]))
    if ids[0] == ids[1]:
        raise ValueError(
            f"labels {tuple(labels)} are the same token ({ids[0]}): the judge cannot tell them apart"
        )
    return ids[0], ids[1]


def weights_sha256(path: str | os.PathLike, exclude: Sequence[str] = ()) -> str:
    """sha256 over a model directory's ``*.safetensors`` files, in sorted name order (``exclude``: names).

    Read from the bytes on disk (or the objects of a directory given as a URI), so it identifies the
    weights of any model directory and cannot go stale; judgments are cached under it. ValueError when the directory holds no safetensors weights.
    """
    if storage.is_remote(path):  # a checkpoint on object storage: its objects, read in order
        root = storage.path(path)
        files = [root / n for n in storage.names(root) if n.endswith(".safetensors") and n not in exclude]
    else:
        files = sorted(p for p in Path(path).glob("*.safetensors") if p.name not in exclude)
    if not files:
        raise ValueError(f"{storage.display(path)} holds no *.safetensors weights")
    h = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


#: An assay checkpoint's optimizer and scheduler state (training/checkpoint.py): stored beside the
#: weights as safetensors, but not part of what the model computes.
TRAINER_STATE_FILE = "trainer_state.safetensors"


def model_id_for(path: str | os.PathLike) -> str:
    """``<directory name>@<first 16 hex of the weights hash>``: a judge's and an encoder's part of the
    cache keys. The trainer state is left out: two runs that end with the same weights are the same
    model, whatever their optimizer state."""
    name = storage.path(path).name if storage.is_remote(path) else Path(path).resolve().name
    return f"{name}@{weights_sha256(path, exclude=(TRAINER_STATE_FILE,))[:16]}"
