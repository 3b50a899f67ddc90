"""What a stage trains on: the rows of one or more assay datasets, turned into training units.

``TrainingData`` reads the queries, corpus and pairs of the datasets named by a config and indexes
them by id. Images stay on disk (or inline, as the dataset has them) until a batch needs them, and
an image path may never lead out of its dataset's data root. That rule is kept in two cheap halves
instead of one ``realpath`` per row up front (4.7 s for the 34k paths of easy-vqa): loading checks
each path lexically against the data root (resolved once per dataset), so ``../`` and absolute
paths elsewhere are refused before training starts; ``read_image_bytes`` resolves symlinks when a
file is first read and refuses one that leads out. Each stage asks for its own units:

- stage 1 and the reranker: ``generative_units`` / ``reranker_units``, (image, prompt) -> text
  samples for next-token training (``generative_sample`` says which side is the input);
- stages 2 and 3: ``contrastive_units``, one per gold (query, positive) pair, with the hard
  negatives the stage reads from pairs and the docs each query must never be pushed away from
  (its other positives and its false negatives).

``epoch_batches`` cuts units into batches, deterministically from (seed, epoch), so a run resumed at
step s sees exactly the batches an uninterrupted run would have: no sampler state to save.
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.schema import resolve_image_path

QUERY_COLUMNS = ["query_id", "subset", "task", "instruction", "text", "image"]
DOC_COLUMNS = ["doc_id", "subset", "instruction", "text", "image"]
PAIR_COLUMNS = ["query_id", "doc_id", "label", "rank", "judge_verdict"]
NEGATIVE_LABELS = ("hard_negative", "negative")
#: Prompts of generative samples whose input side has an image but no text to ask with.
CAPTION_PROMPT = "Describe the image."
LABEL_PROMPT = "What is shown in the image? Answer with its class label."


class TrainingDataError(ValueError):
    """Datasets a stage cannot train on (nothing to learn from, or a broken reference)."""


@dataclass(frozen=True)
class ContrastiveUnit:
    query: int  # row in TrainingData.queries
    positive: int  # row in TrainingData.corpus
    negatives: tuple[int, ...] = ()


@dataclass
class TrainingData:
    queries: list[dict[str, Any]]
    corpus: list[dict[str, Any]]
    query_index: dict[str, int]
    doc_index: dict[str, int]
    positives: dict[int, list[int]] = field(default_factory=dict)  # query row -> doc rows
    negatives: dict[int, list[tuple[float, int, str | None]]] = field(default_factory=dict)
    false_negatives: dict[int, set[int]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    # -- reading

    @classmethod
    def load(cls, paths: Iterable[str], subsets: Sequence[str] | None = None) -> TrainingData:
        """Read the datasets at ``paths``; keep only ``subsets`` when given. A duplicated id keeps
        its first row (ids are content hashes: the same id is the same content)."""
        data = cls([], [], {}, {}, sources=[str(p) for p in paths])
        keep = set(subsets) if subsets else None
        pairs: list[tuple[int, int, str, Any, Any]] = []
        for path in data.sources:
            ds = Dataset(path)
            # once per dataset; each path is checked against it (a URI: lexically, no symlinks there)
            root = (
                storage.absolute(ds.data_root)
                if storage.is_remote(ds.data_root)
                else os.path.realpath(ds.data_root)
            )
            for row in _rows(ds, "queries", QUERY_COLUMNS, root):
                if (keep is None or row["subset"] in keep) and row["query_id"] not in data.query_index:
                    data.query_index[row["query_id"]] = len(data.queries)
                    data.queries.append(row)
            for row in _rows(ds, "corpus", DOC_COLUMNS, root):
                if row["doc_id"] not in data.doc_index:
                    data.doc_index[row["doc_id"]] = len(data.corpus)
                    data.corpus.append(row)
            for batch in ds.iter_batches("pairs", columns=PAIR_COLUMNS):
                cols = batch.to_pydict()
                for qid, did, label, rank, verdict in zip(*(cols[c] for c in PAIR_COLUMNS), strict=True):
                    q, d = data.query_index.get(qid), data.doc_index.get(did)
                    if q is not None and d is not None:
                        pairs.append((q, d, label, rank, verdict))
        for q, d, label, rank, verdict in pairs:
            if label == "positive":
                data.positives.setdefault(q, []).append(d)
            elif label == "false_negative" or (label in NEGATIVE_LABELS and verdict == "yes"):
                data.false_negatives.setdefault(q, set()).add(d)
            elif label in NEGATIVE_LABELS:
                order = float(rank) if rank is not None else math.inf
                data.negatives.setdefault(q, []).append((order, d, verdict))
        for q, docs in data.positives.items():
            data.positives[q] = sorted(set(docs))
            data.false_negatives.get(q, set()).difference_update(docs)  # gold wins over a judgment
        for negs in data.negatives.values():
            negs.sort(key=lambda t: (t[0], t[1]))
        if not data.positives:
            raise TrainingDataError(
                f"no positive pairs in {', '.join(data.sources)}"
                + (f" for subsets {', '.join(sorted(keep))}" if keep else "")
                + ": nothing to train on"
            )
        return data

    def subset_of(self, query: int) -> str:
        return self.queries[query]["subset"] or ""

    def has_hard_negatives(self, judged: bool = False) -> bool:
        return any(v == "no" or not judged for negs in self.negatives.values() for _, _, v in negs)

    # -- units per stage

    def positive_pairs(self) -> list[tuple[int, int]]:
        return [(q, d) for q in sorted(self.positives) for d in self.positives[q]]

    def generative_units(self) -> list[tuple[int, int]]:
        """Gold pairs that make a next-token sample (``generative_sample`` is not None)."""
        return [
            (q, d)
            for q, d in self.positive_pairs()
            if generative_sample(self.queries[q], self.corpus[d]) is not None
        ]

    def reranker_units(
        self, negatives_per_positive: int, seed: int
    ) -> list[tuple[int, int, tuple[int, ...]]]:
        """(query, positive, negatives): one group per gold pair, trained in one step, the gold pair
        answered "yes" and each of its ``negatives_per_positive`` negatives "no": the query's labelled
        negatives first (by rank), then docs of its subset drawn at random (seeded) that are neither
        its positives nor its false negatives.

        A pair and its negatives share a step because the verdict is about the *pair*: with the same
        query answered both ways in one gradient, what the query alone predicts cancels and what is
        left is whether the doc matches it. Shuffled apart, a tiny model never gets past the yes/no
        prior on image queries (classification AUC 0.515 vs 0.967 grouped, docs/BENCHMARKS.md).
        """
        rng = random.Random(seed)
        by_subset: dict[str, list[int]] = defaultdict(list)
        for d, row in enumerate(self.corpus):
            by_subset[row["subset"] or ""].append(d)
        units: list[tuple[int, int, tuple[int, ...]]] = []
        for q in sorted(self.positives):
            pos = self.positives[q]
            banned = set(pos) | self.false_negatives.get(q, set())
            labelled = [d for _, d, _ in self.negatives.get(q, []) if d not in banned]
            pool = [d for d in by_subset[self.subset_of(q)] if d not in banned]
            for d in pos:
                negs = []
                for _ in range(negatives_per_positive):
                    if labelled:
                        negs.append(labelled.pop(0))
                    elif pool:
                        negs.append(pool[rng.randrange(len(pool))])
                units.append((q, d, tuple(negs)))
        return units

    def contrastive_units(self, mode: str, num_negatives: int) -> list[ContrastiveUnit]:
        """One unit per gold pair; hard negatives by ``mode``: ``none``, ``mined`` (labelled
        hard_negative / negative, not judged relevant), ``judged`` (only those the judge said
        ``no`` to). Up to ``num_negatives`` per query, lowest rank first."""
        units = []
        for q, d in self.positive_pairs():
            negs: tuple[int, ...] = ()
            if mode != "none" and num_negatives:
                banned = set(self.positives[q]) | self.false_negatives.get(q, set())
                picked = [
                    n
                    for _, n, verdict in self.negatives.get(q, [])
                    if n not in banned and (mode == "mined" or verdict == "no")
                ]
                negs = tuple(dict.fromkeys(picked))[:num_negatives]
            units.append(ContrastiveUnit(q, d, negs))
        return units

    def excluded(self, query: int) -> set[int]:
        """Docs that must not act as negatives of ``query``: its positives and false negatives."""
        return set(self.positives.get(query, ())) | self.false_negatives.get(query, set())


def _rows(ds: Dataset, table: str, columns: list[str], root: str) -> Iterable[dict[str, Any]]:
    checked: dict[str, dict[str, Any] | None] = {}  # path -> its cell: rows sharing a file share it
    for name in ds.shards(table):
        t: pa.Table = ds.read_shard(table, name, columns=columns)
        for row in t.to_pylist():
            image = row["image"]
            path = image.get("path") if image and not image.get("bytes") else None
            try:
                if path is None:
                    row["image"] = confine_image_cell(image, root)
                elif path in checked:
                    row["image"] = checked[path]
                else:
                    row["image"] = checked[path] = confine_image_cell(image, root)
            except ValueError as e:
                raise TrainingDataError(f"{storage.display(ds.root / table / name)}: {e}") from None
            yield row


def confine_image_cell(image: dict[str, Any] | None, root: str) -> dict[str, Any] | None:
    """An ``image`` cell whose path is made absolute under ``root`` (a real path), checked lexically.

    ``../`` or an absolute path that leaves the root is refused here with ``ValueError``, as
    ``curation.schema.resolve_image_cell`` refuses it. A path that stays inside the root on paper
    may still be a symlink that leads out, and resolving symlinks costs a ``realpath`` (an
    ``lstat`` per path component): that check is left to ``read_image_bytes``, when the file is
    first read. The cell keeps ``root`` for it. A path that looks outside only lexically (an
    absolute path through a symlinked alias of the root) gets the full ``realpath`` check at once.
    """
    if not image:
        return None
    path = image.get("path")
    if path is None:
        return {"bytes": image.get("bytes"), "path": None}
    if storage.is_remote(root):  # an object store has no symlinks: the lexical check is the check
        resolved = resolve_image_path(root, path)
        if not resolved.inside:
            raise ValueError(
                f"image path {path!r} resolves to {storage.display(resolved.full)}, outside the data "
                f"root {storage.display(resolved.root)}"
            )
        return {"bytes": image.get("bytes"), "path": resolved.full, "root": root}
    full = os.path.join(root, path)  # not normalised: "a/../b" must resolve as the file system does
    if not os.path.normpath(full).startswith(root.rstrip(os.sep) + os.sep):
        resolved = resolve_image_path(root, path)
        if not resolved.inside:
            raise ValueError(
                f"image path {path!r} resolves to {resolved.full}, outside the data root {resolved.root}"
            )
        full = resolved.full
    return {"bytes": image.get("bytes"), "path": full, "root": root}


def read_image_bytes(image: dict[str, Any]) -> bytes:
    """The encoded bytes of an image cell: inline bytes, or the file read after its symlinks are
    resolved and found inside the cell's data root (``confine_image_cell`` set ``root``).

    Raises ``TrainingDataError`` for a path that leads out of the root, or a file that cannot be read.
    """
    if image.get("bytes"):
        return image["bytes"]
    path, root = image.get("path"), image.get("root")
    if path is None:
        raise TrainingDataError("image cell has neither bytes nor path")
    if storage.is_remote(path) or (root is not None and storage.is_remote(root)):
        return _read_remote_image(path, root)
    if root is not None:
        resolved = resolve_image_path(root, path)
        if not resolved.inside:
            raise TrainingDataError(
                f"image path {path!r} resolves to {resolved.full}, outside the data root {resolved.root}"
            )
        path = resolved.full
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TrainingDataError(f"cannot read image {path}: {e.strerror or e}") from None


def _read_remote_image(path: str, root: str | None) -> bytes:
    """An image object under a data root URI (``confine_image_cell`` made ``path`` the full URI)."""
    if root is not None and not resolve_image_path(root, path).inside:  # the one confinement check
        raise TrainingDataError(
            f"image path {storage.display(path)} is outside the data root {storage.display(root)}"
        )
    try:
        return storage.read_bytes(path)
    except OSError as e:
        raise TrainingDataError(f"cannot read image {storage.display(path)}: {e.strerror or e}") from None


def generative_sample(query: dict[str, Any], doc: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The (input, target text) of a next-token sample made from a gold pair, or None.

    The side with the image is the input and the other side's text the target: image + question ->
    answer, image -> class label, a document image -> its caption (text-to-image retrieval read
    backwards). Text-only pairs map query text -> doc text. The input is ``{"image", "text"}``.
    """
    q_img, d_img = query.get("image"), doc.get("image")
    if q_img is not None and doc.get("text"):
        prompt = query.get("text") or (
            LABEL_PROMPT if query.get("task") == "classification" else CAPTION_PROMPT
        )
        return {"image": q_img, "text": prompt}, doc["text"]
    if d_img is not None and query.get("text") and q_img is None:
        return {"image": d_img, "text": CAPTION_PROMPT}, query["text"]
    if q_img is None and d_img is None and query.get("text") and doc.get("text"):
        return {"image": None, "text": query["text"]}, doc["text"]
    return None


def epoch_batches(
    unit_subsets: Sequence[str],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    batching: str = "subset",
    max_units_per_subset: int | None = None,
) -> list[list[int]]:
    """The batches (lists of unit indices) of one epoch, the same for the same (seed, epoch).

    ``subset``: each batch holds units of one subset (harder in-batch negatives, as MMEB training
    does), batches of all subsets shuffled together; ``mixed``: one shuffled stream.
    ``max_units_per_subset`` draws at most that many units of each subset per epoch (a new draw each
    epoch), so one large subset does not drown the others.
    """
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(unit_subsets):
        groups[s].append(i)
    batches: list[list[int]] = []
    pooled: list[int] = []
    for key in sorted(groups):
        units = groups[key][:]
        rng.shuffle(units)
        if max_units_per_subset is not None:
            units = units[:max_units_per_subset]
        if batching == "subset":
            batches.extend(units[i : i + batch_size] for i in range(0, len(units), batch_size))
        else:
            pooled.extend(units)
    if batching == "mixed":
        rng.shuffle(pooled)
        batches = [pooled[i : i + batch_size] for i in range(0, len(pooled), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(unit_subsets: Sequence[str], batch_size: int, batching: str, cap: int | None) -> int:
    """Batches per epoch (the same every epoch: only their contents are redrawn)."""
    batches = epoch_batches(
        unit_subsets, batch_size, seed=0, epoch=0, batching=batching, max_units_per_subset=cap
    )
    return len(batches)
