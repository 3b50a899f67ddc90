"""The training config: one YAML file per stage run, checked before any work starts.

A config names the stage, the datasets, where the checkpoints go, and the model to start from::

    stage: "2"                    # 1 | 2 | 3 | reranker
    data: [runs/easy/train-dedup] # one or more assay datasets
    output: runs/easy/stage2      # checkpoints step-NNNNNN/ and train_log.jsonl go here
    init: runs/easy/stage1/step-000400   # a checkpoint or a pretrained InternVL -hf directory
    lora: {rank: 16}              # or null for full parameters
    lr: 2.0e-4
    batch_size: 64                # queries per step (GradCache makes it independent of memory);
                                  # the reranker: gold pairs per step, each with its negatives
    mini_batch: 8                 # rows encoded at a time
    input_cache: auto             # prepared inputs in OUTPUT/../cache/inputs; off, or a directory

With no ``init``, ``tiny`` builds a small randomly initialised InternVL of the real architecture,
with a tokenizer trained on the datasets' texts (tests and the quickstart: any stage from scratch;
the same data gives the same tokenizer, so a stage-1 and a stage-2 run of the same data agree).

The schema is ``TrainConfig`` (pydantic, ``curation.config_schema.StrictModel``): unknown keys, wrong
types and impossible values are refused with the file and the key named (``lora.rank must be >= 1,
got 0``); nothing is guessed or converted, but for an int where a float is wanted (``lr: 1``), and
``stage: 2`` and ``data: DIR`` (a single directory), which YAML users write naturally.

Defaults follow PAPER.md per stage (``STAGE_DEFAULTS``): stage 1 full parameters at lr 1e-5; stages
2 and 3 LoRA rank 16 at lr 2e-4, temperature 0.03; stage 3 up to 12 judged hard negatives.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from assay.curation import storage
from assay.curation.config_schema import StrictModel, explain

Stage = Literal["1", "2", "3", "reranker"]
#: Which hard negatives a contrastive stage reads from pairs.
NegativeMode = Literal["auto", "none", "mined", "judged"]
Batching = Literal["subset", "mixed"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
STAGES: tuple[str, ...] = get_args(Stage)
NEGATIVE_MODES: tuple[str, ...] = get_args(NegativeMode)
BATCHING: tuple[str, ...] = get_args(Batching)
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: Settings that change how a run executes but not what it computes: a resumed run may change them.
RUNTIME_KEYS = frozenset(
    {"device", "save_every", "keep_checkpoints", "progress", "output", "log_every", "input_cache"}
)
#: The language model's linear layers (Qwen2 names): LoRA's default targets. The vision tower stays
#: frozen, as in the paper's LoRA stages.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class ConfigError(ValueError):
    """A training config that cannot be run as written."""


class LoraSettings(StrictModel):
    rank: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, gt=0)
    dropout: float = 0.0
    target_modules: str | list[str] = LORA_TARGETS


class TinySettings(StrictModel):
    """Sizes of the from-scratch model (see ``training.tiny.build_tiny``)."""

    hidden_size: int = 64
    num_layers: int = 2
    image_size: int = 64
    patch_size: int = 2
    vocab_size: int = 1024
    layer_scale: float = 0.1  # the vision tower's residual-branch scale at init (InternViT: 0.1)
    seed: int = 0


class TrainConfig(StrictModel):
    """One stage run; the schema of the YAML file (see the module docstring)."""

    stage: Stage
    data: list[str] = Field(min_length=1, description="one or more dataset directories")
    output: str = Field(min_length=1, description="the run directory for checkpoints")
    init: str | None = None
    tiny: TinySettings | None = None
    tokens_per_tile: int | None = None
    lora: LoraSettings | None = None
    #: Train everything but the vision tower (its weights stay the init's). For a judge started from
    #: an embedder that already sees the images: it learns to compare, and cannot unlearn to see.
    freeze_vision: bool = False
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, ge=1)
    mini_batch: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.03, gt=0)
    negatives: NegativeMode = "auto"
    num_negatives: int = Field(default=2, ge=0)
    #: The reranker: "no" examples per gold "yes", in the same step.
    negatives_per_positive: int = Field(default=1, ge=1)
    batching: Batching = "subset"
    max_units_per_subset: int | None = None
    subsets: list[str] | None = None
    max_text_chars: int = 2000
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    save_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = 1
    progress: bool = True
    trust_remote_code: bool = False
    #: Where prepared model inputs (image tiles, token ids) are kept between steps, stages and runs:
    #: ``auto`` is ``OUTPUT/../cache/inputs`` (beside the run's other steps), ``off`` runs the
    #: processor on every batch, anything else is a directory (training/input_cache.py).
    input_cache: str = Field(default="auto", min_length=1, description="auto, off, or a directory")
    extra: dict[str, Any] = Field(default_factory=dict)  # free-form notes carried into the manifest

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        if value:
            raise ValueError("must be false: assay loads transformers-native models only")
        return value

    @field_validator("input_cache")
    @classmethod
    def _local_input_cache(cls, value: str) -> str:
        if storage.is_remote(value):
            raise ValueError(
                "must be a local directory (auto, off, or a path): the cache is read memory-mapped; "
                "with an output URI, auto keeps it beside the run's local working folder"
            )
        return value

    @model_validator(mode="after")
    def _init_or_tiny(self) -> TrainConfig:
        if self.init is None and self.tiny is None:
            raise ValueError("give init (a checkpoint or model directory) or tiny")
        if self.init is not None and self.tiny is not None:
            raise ValueError("give init or tiny, not both")
        return self

    # -- derived

    @property
    def contrastive(self) -> bool:
        return self.stage in ("2", "3")

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


#: PAPER.md's settings per stage; a key the YAML leaves out takes these before the schema's default.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "1": {"lr": 1e-5, "lora": None},
    "2": {"lr": 2e-4, "lora": {}, "negatives": "auto", "num_negatives": 2},
    "3": {"lr": 2e-4, "lora": {}, "negatives": "judged", "num_negatives": 12},
    "reranker": {"lr": 1e-4, "lora": None},
}


def config_from_dict(raw: dict[str, Any], where: str = "config", **overrides: Any) -> TrainConfig:
    """A checked ``TrainConfig`` from a mapping (a parsed YAML file), overrides applied last."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    stage = str(raw.get("stage", ""))  # `stage: 2` is read as an int by YAML
    if stage not in STAGES:
        raise ConfigError(f"{where}: stage must be one of {', '.join(STAGES)}, got {raw.get('stage')!r}")
    raw = {**STAGE_DEFAULTS[stage], **raw, "stage": stage}
    if isinstance(raw.get("data"), str):
        raw["data"] = [raw["data"]]
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {explain(e, TrainConfig)}") from None


def load_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Read and check a YAML config (a path or a URI); relative paths in it are taken from the
    current directory."""
    path = storage.path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is read, no tags): {e}") from None
    return config_from_dict(raw if raw is not None else {}, str(path), **overrides)
