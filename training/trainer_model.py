"""The model a stage run of the trainer (training.trainer) trains.

A fresh run starts from ``init`` (its weights hash is the run's parent) or from a tiny model built
for the data (``tiny``, tests and benchmarks); a resumed run from its latest checkpoint, or, with
LoRA, from ``init`` (checked against the parent by weights hash) with the checkpoint's adapter.
``freeze_vision`` takes the vision tower out of training.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from assay.curation import storage
from assay.curation.dataset import fingerprint
from assay.training.checkpoint import (
    ADAPTER_DIR,
    CheckpointError,
    TrainingState,
    load_checkpoint,
    local_model_path,
    weights_hash,
)
from assay.training.config import TrainConfig
from assay.training.data import CAPTION_PROMPT, LABEL_PROMPT, TrainingData
from assay.training.model import MMEmbedder, load_embedder
from assay.training.steps import TrainingError

__all__ = ["VISION_PARAMETERS", "freeze_vision", "fresh_model", "resumed_model"]


def fresh_model(config: TrainConfig, data: TrainingData) -> tuple[MMEmbedder, str | None]:
    """The model a run with no checkpoint starts from (seeded with ``config.seed``, wrapped in LoRA if
    asked), and the weights hash of where it came from (None for a tiny model)."""
    torch.manual_seed(config.seed)
    embedder, parent = _initial_embedder(config, data)
    if config.lora is not None:
        _wrap_lora(embedder, config)
    return embedder, parent


def resumed_model(
    config: TrainConfig, data: TrainingData, resume: Path
) -> tuple[MMEmbedder, str | None, TrainingState]:
    """The model of checkpoint ``resume`` (with LoRA: the stage's init with the checkpoint's adapter),
    the weights hash the run started from, and the training state to restore."""
    embedder, state = load_checkpoint(resume)
    if state.stage != config.stage or state.manifest.training_config_fingerprint != fingerprint(
        config.resume_key()
    ):
        raise TrainingError(
            f"{resume} was written by a different config (stage {state.stage}); "
            "resume with the same config, or give a new output directory"
        )
    parent = state.manifest.parent
    if config.lora is not None:
        embedder, init_hash = _initial_embedder(config, data)
        if init_hash != parent:
            raise TrainingError(
                f"init {config.init} changed since {resume} was written (weights hash "
                f"{(init_hash or '')[:12]} != {(parent or '')[:12]}): cannot resume its LoRA adapter"
            )
        _wrap_lora(embedder, config)
        _resume_lora(embedder, resume)
    return embedder, parent, state


def _dataset_texts(data: TrainingData) -> list[str]:
    texts = [r[k] for r in data.queries for k in ("text", "instruction") if r.get(k)]
    texts += [r[k] for r in data.corpus for k in ("text", "instruction") if r.get(k)]
    return [*dict.fromkeys(texts), CAPTION_PROMPT, LABEL_PROMPT]


def _initial_embedder(config: TrainConfig, data: TrainingData) -> tuple[MMEmbedder, str | None]:
    """The model a fresh run starts from, and the weights hash of where it came from."""
    if config.tiny is not None:
        from assay.training.tiny import build_tiny

        t = config.tiny
        model, processor = build_tiny(
            _dataset_texts(data),
            tokens_per_tile=config.tokens_per_tile or 64,
            image_size=t.image_size,
            patch_size=t.patch_size,
            hidden_size=t.hidden_size,
            num_layers=t.num_layers,
            vocab_size=t.vocab_size,
            layer_scale=t.layer_scale,
            seed=t.seed,
        )
        return MMEmbedder(model, processor), None
    init = _local_init(config.init) if storage.is_remote(config.init) else Path(config.init)
    if not init.is_dir():
        raise TrainingError(f"init {config.init}: no such model directory")
    embedder = load_embedder(init, tokens_per_tile=config.tokens_per_tile)
    return embedder, weights_hash(init)


def _local_init(uri: str) -> Path:
    """A local copy of an ``init`` given as a URI (``checkpoint.local_model_path``)."""
    try:
        return local_model_path(uri)
    except (CheckpointError, ValueError, OSError) as e:
        raise TrainingError(f"init {storage.display(uri)}: {e}") from None


def _wrap_lora(embedder: MMEmbedder, config: TrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    embedder.model = get_peft_model(embedder.model, peft_config)


#: Parameter names of a vision tower: InternVL's ``vision_tower``, Qwen2-VL's ``visual``.
VISION_PARAMETERS = re.compile(r"(^|\.)(vision_tower|visual)\.")


def freeze_vision(embedder: MMEmbedder) -> None:
    """``freeze_vision``: the vision tower's parameters take no gradient (and no optimizer state)."""
    frozen = [p for name, p in embedder.model.named_parameters() if VISION_PARAMETERS.search(name)]
    if not frozen:
        raise TrainingError(
            "freeze_vision: this model has no vision tower (no vision_tower. / visual. parameters)"
        )
    for p in frozen:
        p.requires_grad_(False)


def _resume_lora(embedder: MMEmbedder, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
    if not file.is_file():
        raise TrainingError(f"{checkpoint} holds no LoRA adapter ({ADAPTER_DIR}/): cannot resume a LoRA run")
    result = set_peft_model_state_dict(embedder.model, load_file(file))
    if result.unexpected_keys:
        raise TrainingError(f"{file}: adapter keys this model does not have: {result.unexpected_keys[:3]}")
