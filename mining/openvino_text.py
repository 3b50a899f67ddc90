"""A sentence-transformers text model's transformer run in float32 by OpenVINO's CPU runtime.

What ``precision="fast"`` is for a sentence-transformers text model on the CPU when the
``openvino`` package is installed (``pip install 'assay[openvino]'``): the same float32 arithmetic as
torch in OpenVINO's CPU kernels (the matrix products are the same work; the time saved is in the
rest of the model), so the vectors stay within ~1e-6 of torch's and the mined negatives are the
exact mode's, in 0.8-0.9 of torch's encoding time on a 2-core AVX-512 CPU, within a few percent
of the float32 floor (the linear layers alone at torch's matrix-product rate; docs/BENCHMARKS.md,
issue 19, ``bench/encoder_engines.py``).
A lower precision cannot do that: bfloat16 moves scores by ~1e-3 and changes 13-15% of the
queries' top-3 negatives, and ``bench/mining_fast_recheck.py`` measures that a fast encoder needs
under 0.3x of bfloat16's error to keep 95% of them.

Only the transformer (``model[0].auto_model``, a Hugging Face module) runs on OpenVINO: it is
converted in memory (``openvino.convert_model``, traced on a two-row example; no file, no
ONNX, nothing downloaded) the first time rows are encoded, so a run that finds every vector in the
embedding cache converts nothing. The modules after it (pooling, dense layers, normalisation)
are the model's own, run by torch on the token embeddings OpenVINO returns.

No telemetry: OpenVINO reports usage to Google Analytics unless the user has opted out
(``openvino_telemetry``, on by default: ``import openvino`` alone writes a client id under
``~/intel`` and sends an "import" event). assay imports openvino with ``openvino_telemetry`` made
unimportable for that moment (``_import_openvino``), so the converter binds its own no-op stub, as
it does where the package is missing; and where openvino was imported before assay, the converter's
telemetry is swapped for that stub while assay converts (``_no_telemetry``). Nothing is sent and
nothing is written.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

#: The tokenizer outputs a Hugging Face text encoder's forward takes.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _import_openvino() -> Any:
    """``import openvino`` without its telemetry: a ``None`` in ``sys.modules`` makes
    ``import openvino_telemetry`` fail, and OpenVINO's converter then binds its no-op stub."""
    if "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
        try:
            import openvino
        finally:
            if sys.modules.get("openvino_telemetry", 0) is None:
                del sys.modules["openvino_telemetry"]
    import openvino

    return openvino


def available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        _import_openvino()
    except ImportError:
        return False
    return True


def supports(model: Any) -> bool:
    """Whether ``model`` (a ``SentenceTransformer``) is a text model this engine can run: its first
    module a transformers text encoder with a tokenizer, nothing but text going in."""
    first = model[0] if len(model) else None
    auto = getattr(first, "auto_model", None)
    return (
        auto is not None
        and getattr(model, "tokenizer", None) is not None
        and hasattr(auto, "config")
        and not getattr(auto.config, "is_encoder_decoder", False)
        and getattr(auto, "main_input_name", "input_ids") == "input_ids"
    )


#: The converter's modules that hold the telemetry module as ``tm``.
_TELEMETRY_USERS = ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils")


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """OpenVINO's no-op telemetry stub in place of ``openvino_telemetry`` in the converter."""
    from openvino.tools.ovc import telemetry_stub

    swapped = []
    for name in _TELEMETRY_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "tm"):
            swapped.append((module, module.tm))
            module.tm = telemetry_stub
    try:
        yield
    finally:
        for module, original in swapped:
            module.tm = original


class OpenVINOText:
    """``encode(texts) -> (n, d)`` float32, L2-normalised: ``model``'s transformer on OpenVINO, the
    rest of ``model`` (pooling and after) on torch. Converted on the first call."""

    def __init__(self, model: Any):
        self.model = model
        self._request = None
        self._inputs: tuple[str, ...] = ()

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """The model's own preprocessing (its tokenizer, ``max_seq_length``, lower-casing)."""
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # ST 5 / ST 3-4
        return prepare(texts)

    def _compile(self) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        ov = _import_openvino()
        # Traced on two rows of different lengths, so the attention mask holds padding: a trace only
        # sees the branches its example takes, and transformers can skip an all-ones mask.
        features = self._features(["an example", "a longer example of a text row"])
        example = {k: features[k] for k in MODEL_INPUTS if k in features}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the config notes transformers logs while it is traced
        try:
            with torch.no_grad(), warnings.catch_warnings(), _no_telemetry():
                warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
                converted = ov.convert_model(self.model[0].auto_model.eval(), example_input=example)
        finally:
            hf_logging.set_verbosity(verbosity)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(converted, "CPU", config)
        self._inputs = tuple(p.get_any_name() for p in compiled.inputs)
        self._request = compiled.create_infer_request()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        features = self._features(texts)
        if self._request is None:
            self._compile()
        hidden = self._request.infer({k: features[k].numpy().astype(np.int64) for k in self._inputs})[0]
        features["token_embeddings"] = torch.from_numpy(np.array(hidden, np.float32))
        with torch.no_grad():
            for module in list(self.model)[1:]:
                features = module(features)
        vectors = features["sentence_embedding"].numpy().astype(np.float32)
        return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
