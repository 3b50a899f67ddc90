"""The input cache: what the processor made of each image and prompt, kept on disk for the next step.

A training step needs tensors, and making them is work the model does not do: decode the image,
resize and normalise it into tiles (InternVL's image processor), render the prompt and tokenise it
with one ``<IMG_CONTEXT>`` per visual token. ``InputCache`` keeps both results, keyed by content:

- ``pixels``: one image's tiles, ``(tiles, 3, H, W)`` float32 exactly as the processor returned
  them, under the hash of the image's encoded bytes (so the ten questions easy-vqa asks about one
  picture share one entry, and a file replaced under the same name is a new entry);
- ``ids``: one prompt's token ids (unpadded), under the hash of the text handed to the processor
  and the tile count of each of its images.

A directory per processor configuration holds the entries; its name is ``processor_key``, a hash
of everything that changes the tensors: the image processor's settings (tile size, mean, std,
resampling), ``max_tiles``, the tokens per tile (``image_seq_length``), the tokenizer (its whole
serialised vocabulary and rules) and the transformers version. A different setting never reads
another's entries; it starts a directory of its own::

    <cache>/<processor_key>/
        key.json                      what the key was computed from, for people
        shard-<random>.safetensors    entries, written a shard at a time

A shard is one safetensors file (no pickle): a ``pixels`` tensor and an ``ids`` tensor (int32)
holding its entries end to end, and in the header's metadata an ``index``, JSON
``{entry: [kind, offset, length, crc32, height, width]}``. Shards are written whole under a
temporary name and renamed (``curation.dataset.atomic_write_bytes``), so a reader sees a complete
shard or none; several processes (data-parallel workers, two runs) may share a directory, each
writing shards of its own. Files are read memory-mapped, an entry at a time.

Nothing in the cache is trusted blindly: a shard whose header cannot be read, or whose index points
outside its tensors, is deleted when the cache opens; an entry whose bytes do not match its CRC32
when first read condemns its shard (deleted, its entries prepared again). A cache that cannot be
written (a full disk, a read-only folder) logs one warning and the run goes on without saving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import torch

from assay.curation.dataset import TMP_PREFIX, atomic_write_bytes, fingerprint

log = logging.getLogger(__name__)

#: Bumped when the shard layout or what an entry means changes: old directories are then ignored.
CACHE_FORMAT = 1
KEY_FILE = "key.json"
SHARD_GLOB = "shard-*.safetensors"
#: Entries wait in memory until this many bytes of tensors are pending, then become one shard.
FLUSH_BYTES = 64 << 20
#: A temporary file older than this was left by a killed writer (a live one finishes in seconds).
STALE_TMP_SECONDS = 3600
PIXELS, IDS = "p", "t"


def processor_key(processor: Any, max_tiles: int) -> tuple[str, dict[str, Any]]:
    """(key, what it was computed from) for a processor and an embedder's ``max_tiles``.

    The tokenizer enters as the SHA-256 of its serialised form (vocabulary, merges, added tokens,
    normaliser and post-processor), so two tokenizers that encode differently never share a key;
    less its padding and truncation state, which every batched call sets anew.
    """
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # padding and truncation are set on the backend by each call (they change no row's ids)
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        serialised = json.dumps(state, sort_keys=True)
    else:
        serialised = json.dumps(sorted(tok.get_vocab().items()))
    import transformers

    blob = {
        "format": CACHE_FORMAT,
        "processor": type(processor).__name__,
        "image_processor": {"class": type(processor.image_processor).__name__}
        | processor.image_processor.to_dict(),
        "image_seq_length": int(processor.image_seq_length),
        "max_tiles": int(max_tiles),
        "tokenizer": type(tok).__name__,
        "tokenizer_sha256": hashlib.sha256(serialised.encode()).hexdigest(),
        "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "transformers": transformers.__version__,
    }
    return fingerprint(blob), blob


def entry_key(kind: str, payload: bytes) -> str:
    """The name of an entry: its kind and a 128-bit BLAKE2 hash of what it was made from."""
    return kind + hashlib.blake2b(payload, digest_size=16).hexdigest()


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


class _Shard:
    """One shard file, open memory-mapped: reads an entry's slice of ``pixels`` or ``ids``."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.file = safe_open(str(path), framework="pt")
        meta = self.file.metadata() or {}
        if meta.get("format") != str(CACHE_FORMAT):
            raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        self.index: dict[str, list] = json.loads(meta["index"])
        sizes = {name: self.file.get_slice(name).get_shape() for name in ("pixels", "ids")}
        for key, (kind, offset, length, *_rest) in self.index.items():
            total = sizes["pixels" if kind == PIXELS else "ids"]
            if kind not in (PIXELS, IDS) or offset < 0 or length < 0 or offset + length > (total or [0])[0]:
                raise ValueError(f"entry {key} points outside the shard's tensors")

    def read(self, key: str) -> torch.Tensor:
        kind, offset, length, *_ = self.index[key]
        return self.file.get_slice("pixels" if kind == PIXELS else "ids")[offset : offset + length]


class InputCache:
    """Prepared inputs on disk under ``root/<processor_key>/`` (see the module docstring).

    ``get_pixels`` / ``get_ids`` return an entry or None; ``put_pixels`` / ``put_ids`` add one
    (held in memory, written as a shard once ``FLUSH_BYTES`` are pending, and by ``flush``). Safe to
    call from several threads. ``root=None`` keeps nothing: every ``get`` misses.
    """

    def __init__(self, root: str | os.PathLike | None, processor: Any, max_tiles: int):
        self.key, self.key_blob = processor_key(processor, max_tiles)
        self.directory = Path(root) / self.key if root is not None else None
        self._lock = threading.RLock()
        self._shards: list[_Shard] = []
        self._where: dict[str, _Shard] = {}
        self._verified: set[str] = set()
        self._pending: dict[str, tuple[str, torch.Tensor, tuple[int, int]]] = {}
        self._pending_bytes = 0
        self._writable = self.directory is not None
        self.hits = self.misses = 0
        if self.directory is not None:
            self._open()

    # -- reading

    def get_pixels(self, key: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(tiles, original (height, width)) of an image entry, or None."""
        found = self._get(key)
        return None if found is None else (found[0], found[1])

    def get_ids(self, key: str) -> torch.Tensor | None:
        """The int64 token ids of a prompt entry, or None."""
        found = self._get(key)
        return None if found is None else found[0].long()

    def _get(self, key: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
        with self._lock:
            if key in self._pending:
                self.hits += 1
                _, tensor, size = self._pending[key]
                return tensor, size
            shard = self._where.get(key)
            if shard is None:
                self.misses += 1
                return None
            try:
                tensor = shard.read(key)
                if key not in self._verified:
                    if _crc(tensor) != shard.index[key][3]:
                        raise ValueError(f"entry {key} fails its CRC32")
                    self._verified.add(key)
            except Exception as e:  # noqa: BLE001 - any failure to read means: do not trust this shard
                self._drop(shard, str(e))
                self.misses += 1
                return None
            self.hits += 1
            *_, height, width = shard.index[key]
            return tensor, (height, width)

    # -- writing

    def put_pixels(self, key: str, tiles: torch.Tensor, size: tuple[int, int]) -> None:
        self._put(key, PIXELS, tiles.detach().to(torch.float32).contiguous(), size)

    def put_ids(self, key: str, ids: torch.Tensor) -> None:
        self._put(key, IDS, ids.detach().to(torch.int32).contiguous(), (0, 0))

    def _put(self, key: str, kind: str, tensor: torch.Tensor, size: tuple[int, int]) -> None:
        if self.directory is None:
            return
        with self._lock:
            if key in self._pending or key in self._where:
                return
            self._pending[key] = (kind, tensor, size)
            self._pending_bytes += tensor.numel() * tensor.element_size()
            if self._pending_bytes >= FLUSH_BYTES:
                self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard (nothing to do when none are pending)."""
        with self._lock:
            pending, self._pending, self._pending_bytes = self._pending, {}, 0
            if not pending or not self._writable:
                return
            path = self.directory / f"shard-{uuid.uuid4().hex}.safetensors"
            try:
                atomic_write_bytes(path, _shard_bytes(pending))
                shard = _Shard(path)
            except OSError as e:
                self._writable = False
                log.warning(
                    "input cache %s: cannot write (%s); this run goes on without saving prepared inputs",
                    self.directory,
                    e.strerror or e,
                )
                return
            self._add(shard)

    # -- the directory

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_file = self.directory / KEY_FILE
            if not key_file.is_file():
                atomic_write_bytes(key_file, json.dumps(self.key_blob, indent=2, sort_keys=True).encode())
        except OSError as e:
            self._writable = False
            log.warning("input cache %s: cannot write (%s); preparing inputs without it", self.directory, e)
        if not self.directory.is_dir():
            return
        now = time.time()
        for tmp in self.directory.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            try:
                shard = _Shard(path)
            except Exception as e:  # noqa: BLE001 - a shard we cannot read is rebuilt, whatever went wrong
                self._discard(path, str(e))
                continue
            self._add(shard)

    def _add(self, shard: _Shard) -> None:
        self._shards.append(shard)
        for key in shard.index:
            self._where.setdefault(key, shard)

    def _drop(self, shard: _Shard, reason: str) -> None:
        self._shards = [s for s in self._shards if s is not shard]
        self._where = {k: s for k, s in self._where.items() if s is not shard}
        self._discard(shard.path, reason)

    def _discard(self, path: Path, reason: str) -> None:
        log.warning("input cache: %s is damaged (%s); deleted, its entries are prepared again", path, reason)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._where) + len(self._pending)


def _shard_bytes(entries: dict[str, tuple[str, torch.Tensor, tuple[int, int]]]) -> bytes:
    """A shard's file: the entries' tensors end to end, and the index in the header's metadata."""
    from safetensors.torch import save

    pixels: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    index: dict[str, list] = {}
    offsets = {PIXELS: 0, IDS: 0}
    for key, (kind, tensor, (height, width)) in entries.items():
        length = int(tensor.shape[0])
        index[key] = [kind, offsets[kind], length, _crc(tensor), int(height), int(width)]
        offsets[kind] += length
        (pixels if kind == PIXELS else ids).append(tensor)
    tensors = {
        "pixels": torch.cat(pixels) if pixels else torch.zeros(0, dtype=torch.float32),
        "ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32),
    }
    return save(tensors, metadata={"format": str(CACHE_FORMAT), "index": json.dumps(index)})
