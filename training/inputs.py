"""Model inputs for the training loop: the processor's tensors, made once and made ahead.

A step of the trainer hands the model tensors: ``input_ids``, ``attention_mask`` and
``pixel_values`` for the contrastive stages (``MMEmbedder.prepare``), plus ``labels`` for the
next-token ones (``training.generative.build_batch``). This module makes the same tensors, bit for
bit, two ways:

- ``CachedInputs`` (the default): each image's tiles and each prompt's token ids come from the
  ``InputCache`` (training/input_cache.py) when an earlier step, epoch, stage or run made them; the
  processor runs only on what is new: once over the rows whose images are new (as a plain loop
  calls it; with dynamic tiling once per new image), and for a new prompt over images already
  cached the tokenizer alone (token ids depend on an image's tile count, not its pixels: see
  ``CachedInputs._ids``). A batch is then a padding and a concatenation.
- ``ProcessorInputs`` (``input_cache: off``): the processor on every batch, as a plain loop does.

Either way images are read through ``training.data.read_image_bytes``, which refuses a path that
resolves out of its data root, and ``Prefetcher`` runs the preparation of the next steps on a
background thread while the current one computes, so a step waits for its inputs only when the
preparation is slower than the model.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from assay.curation.schema import load_image
from assay.training.data import read_image_bytes
from assay.training.generative import IGNORE, Sample, build_batch
from assay.training.input_cache import IDS, PIXELS, InputCache, entry_key
from assay.training.model import MMEmbedder, Side

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class ProcessorInputs:
    """The processor on every batch (``input_cache: off``): the reference the cache must equal."""

    def __init__(self, embedder: MMEmbedder):
        self.embedder = embedder
        self.cache: InputCache | None = None

    def embed(self, rows: Sequence[Mapping[str, Any]], side: Side) -> Batch:
        """What ``MMEmbedder.prepare(rows, side)`` gives, images read inside their data roots."""
        return dict(self.embedder.prepare([_readable(r) for r in rows], side))

    def generative(self, samples: Sequence[Sample], end_of_turn: bool) -> Batch:
        """What ``training.generative.build_batch`` gives, images read inside their data roots."""
        readable = [Sample(s.parts, [_readable_cell(i) for i in s.images], s.target) for s in samples]
        return build_batch(self.embedder, readable, end_of_turn=end_of_turn)

    def close(self) -> None:
        pass


class CachedInputs:
    """The processor's tensors from the ``InputCache``, the processor run only on what is new."""

    def __init__(self, embedder: MMEmbedder, cache: InputCache):
        self.embedder = embedder
        self.cache = cache
        proc = embedder._processor
        self.image_token = proc.image_token
        self.tokenizer = proc.tokenizer
        self._path_keys: dict[str, str] = {}  # image path -> entry key, so a file is read once a run
        self._chat: dict[str, str] = {}  # a user turn's parts (JSON) -> its rendered prompt
        self._expansion_matches: bool | None = None  # see _ids

    def embed(self, rows: Sequence[Mapping[str, Any]], side: Side) -> Batch:
        """Equal to ``MMEmbedder.prepare(rows, side)``: the prompts padded on the embedder's side."""
        texts = self.embedder.prompts(rows, side)
        images = [[r["image"]] if r.get("image") is not None else [] for r in rows]
        ids, tiles = self._prepared(texts, images)
        return _collate(ids, tiles, self.tokenizer.pad_token_id, self.embedder.padding_side)

    def generative(self, samples: Sequence[Sample], end_of_turn: bool) -> Batch:
        """Equal to ``build_batch(embedder, samples, end_of_turn=...)``: prompt + target, right-padded,
        labels on the target tokens only."""
        texts = [self._chat_prompt(json.dumps(s.parts, sort_keys=True)) for s in samples]
        prompts, tiles = self._prepared(texts, [list(s.images) for s in samples])
        eos = self.tokenizer.eos_token if end_of_turn else ""
        targets = self.tokenizer([s.target + eos for s in samples], add_special_tokens=False)["input_ids"]
        rows = [
            torch.cat([p, torch.tensor(t, dtype=torch.long)]) for p, t in zip(prompts, targets, strict=True)
        ]
        batch = _collate(rows, tiles, self.tokenizer.pad_token_id, "right")
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": labels,
        } | ({"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {})

    def close(self) -> None:
        self.cache.flush()

    def _chat_prompt(self, parts_json: str) -> str:
        """The model's chat template around one user turn (rendered once per distinct turn)."""
        text = self._chat.get(parts_json)
        if text is None:
            turn = [{"role": "user", "content": json.loads(parts_json)}]
            text = self.embedder._processor.apply_chat_template(
                turn, tokenize=False, add_generation_prompt=True
            )
            self._chat[parts_json] = text
        return text

    # -- entries

    def _prepared(
        self, texts: Sequence[str], images: Sequence[Sequence[Any]]
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per prompt: its unpadded token ids (int64), and its images' tiles in prompt order."""
        encoded: dict[str, bytes] = {}  # bytes read while keying, kept for the images to process
        keys = [[self._image_key(cell, encoded) for cell in cells] for cells in images]
        tiles: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        for key in dict.fromkeys(k for row in keys for k in row):
            found = self.cache.get_pixels(key)
            if found is not None:
                tiles[key] = found
        ids: list[torch.Tensor | None] = [None] * len(texts)
        new = [i for i, row in enumerate(keys) if any(k not in tiles for k in row)]
        if new and self.embedder.max_tiles == 1:
            # the processor on these rows, as a plain loop calls it: their pixels and ids at once
            self._process_rows(new, texts, images, keys, encoded, tiles, ids)
        elif new:  # dynamic tiling: an image's tile count is known only from the image alone
            for i in new:
                for key, cell in zip(keys[i], images[i], strict=True):
                    if key not in tiles:
                        tiles[key] = self._process_image(key, cell, encoded)
        id_keys = [
            entry_key(IDS, json.dumps([text, [int(tiles[k][0].shape[0]) for k in row]]).encode())
            for text, row in zip(texts, keys, strict=True)
        ]
        for i, key in enumerate(id_keys):
            if ids[i] is None:
                ids[i] = self.cache.get_ids(key)
            else:
                self.cache.put_ids(key, ids[i])
        todo = [i for i, found in enumerate(ids) if found is None]
        if todo:
            made = self._ids([texts[i] for i in todo], [[tiles[k] for k in keys[i]] for i in todo])
            for i, row in zip(todo, made, strict=True):
                ids[i] = row
                self.cache.put_ids(id_keys[i], row)
        return ids, [[tiles[k][0] for k in row] for row in keys]

    def _ids(
        self, texts: list[str], images: list[list[tuple[torch.Tensor, tuple[int, int]]]]
    ) -> list[torch.Tensor]:
        """Token ids of prompts whose images are prepared already: they depend on each image's tile
        count, not on its pixels. The processor over blank stand-ins of the same sizes gives them
        exactly; the tokenizer over the prompts with each ``<IMG_CONTEXT>`` expanded as the processor
        expands it (``replace_image_token``) gives them without any image work. The second is used
        once it has matched the first on a batch with images; on any mismatch, never again."""
        if self._expansion_matches is False:
            return self._stand_in_ids(texts, images)
        try:
            fast = self._tokenized(texts, [[int(t.shape[0]) for t, _ in row] for row in images])
        except (AttributeError, ValueError):  # a processor without InternVL's expansion, or a prompt
            self._expansion_matches = False  # it would refuse: the processor itself decides
            return self._stand_in_ids(texts, images)
        if self._expansion_matches is None:
            exact = self._stand_in_ids(texts, images)
            if not all(torch.equal(a, b) for a, b in zip(fast, exact, strict=True)):
                log.info("input ids: the tokenizer path differs from the processor's; using the processor")
                self._expansion_matches = False
                return exact
            if any(images):
                self._expansion_matches = True
        return fast

    def _stand_in_ids(
        self, texts: list[str], images: list[list[tuple[torch.Tensor, tuple[int, int]]]]
    ) -> list[torch.Tensor]:
        stand_ins = [_stand_in(size) for row in images for _, size in row]
        out = self.embedder.process(texts, stand_ins, padding_side="right")
        return [out["input_ids"][j][out["attention_mask"][j].bool()].clone() for j in range(len(texts))]

    def _tokenized(self, texts: list[str], tiles: list[list[int]]) -> list[torch.Tensor]:
        proc = self.embedder._processor
        expanded = []
        for text, counts in zip(texts, tiles, strict=True):
            parts = text.split(proc.image_token)
            if len(parts) != len(counts) + 1:
                raise ValueError(
                    f"prompt has {len(parts) - 1} image tokens for {len(counts)} images: {text!r}"
                )
            pieces = [parts[0]]
            for i, part in enumerate(parts[1:]):
                pieces += [proc.replace_image_token({"num_patches": counts}, image_idx=i), part]
            expanded.append("".join(pieces))
        out = proc.tokenizer(expanded, padding=True, padding_side="right", return_tensors="pt")
        return [out["input_ids"][j][out["attention_mask"][j].bool()].clone() for j in range(len(texts))]

    def _process_rows(self, rows, texts, images, keys, encoded, tiles, ids) -> None:
        """One processor call over ``rows`` (one tile per image): their images' tiles and their ids."""
        decoded = [
            load_image(encoded.get(key) or _encoded(cell))
            for i in rows
            for key, cell in zip(keys[i], images[i], strict=True)
        ]
        out = self.embedder.process([texts[i] for i in rows], decoded, padding_side="right")
        pixels = out["pixel_values"]
        if pixels.shape[0] != len(decoded):
            raise RuntimeError(f"the processor made {pixels.shape[0]} tiles of {len(decoded)} images")
        n = 0
        for j, i in enumerate(rows):
            for key in keys[i]:
                if key not in tiles:
                    size = (decoded[n].height, decoded[n].width)
                    tiles[key] = (pixels[n : n + 1].clone(), size)
                    self.cache.put_pixels(key, tiles[key][0], size)
                n += 1
            ids[i] = out["input_ids"][j][out["attention_mask"][j].bool()].clone()

    def _image_key(self, cell: Any, encoded: dict[str, bytes]) -> str:
        if isinstance(cell, bytes | bytearray):
            cell = {"bytes": bytes(cell), "path": None}
        if not isinstance(cell, Mapping):
            raise TypeError(
                f"an image must be a dataset cell {{bytes, path}} or bytes, got {type(cell).__name__}"
            )
        path = None if cell.get("bytes") else cell.get("path")
        if path is not None and path in self._path_keys:
            return self._path_keys[path]
        data = read_image_bytes(dict(cell))
        key = entry_key(PIXELS, data)
        encoded[key] = data
        if path is not None:
            self._path_keys[path] = key
        return key

    def _process_image(
        self, key: str, cell: Mapping[str, Any], encoded: dict[str, bytes]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        image = load_image(encoded.get(key) or _encoded(cell))
        tiles = self.embedder.process([self.image_token], [image])["pixel_values"]
        size = (image.height, image.width)
        self.cache.put_pixels(key, tiles, size)
        return tiles, size


def _encoded(cell: Any) -> bytes:
    return bytes(cell) if isinstance(cell, bytes | bytearray) else read_image_bytes(dict(cell))


def _stand_in(size: tuple[int, int]) -> Image.Image:
    height, width = size
    return Image.new("RGB", (width, height))


def _collate(
    ids: Sequence[torch.Tensor], tiles: Sequence[Sequence[torch.Tensor]], pad: int, side: str
) -> Batch:
    """Rows of token ids padded with ``pad`` on ``side``, and every image's tiles in row order."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        span = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        input_ids[i, span] = x
        mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    flat = [t for row in tiles for t in row]
    if flat:
        batch["pixel_values"] = torch.cat(flat)
    return batch


def _readable_cell(cell: Any) -> Any:
    if isinstance(cell, Mapping):
        return {"bytes": read_image_bytes(dict(cell)), "path": None}
    return cell


def _readable(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if out.get("image") is not None:
        out["image"] = _readable_cell(out["image"])
    return out


def model_inputs(embedder: MMEmbedder, setting: str, output: str | Path) -> CachedInputs | ProcessorInputs:
    """The inputs a run's config asks for: ``input_cache`` is ``auto`` (``OUTPUT/../cache/inputs``,
    beside the run's other steps), ``off``, or a directory."""
    if setting == "off":
        return ProcessorInputs(embedder)
    root = Path(output).parent / "cache" / "inputs" if setting == "auto" else Path(setting)
    return CachedInputs(embedder, InputCache(root, embedder._processor, embedder.max_tiles))


class Prefetcher:
    """``produce(step)`` for each step of ``steps``, run on a background thread ``depth`` steps ahead.

    ``get(step)`` returns the next result (the steps come in order) and re-raises, in the caller's
    thread, an exception ``produce`` raised. ``close`` stops the thread; call it in a ``finally``.
    The producer only reads the data and writes tensors it owns, and consumes no torch RNG, so what a
    step computes does not depend on how far ahead the thread runs.
    """

    def __init__(self, produce: Callable[[int], Any], steps: range, depth: int = 2):
        self._produce, self._steps = produce, steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assay-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item = (step, self._produce(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, step: int) -> Any:
        while True:
            try:
                got, value, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the input thread stopped before step {step + 1}") from None
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"the input thread made step {got + 1}, step {step + 1} was expected")
        return value

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
