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

Unknown keys, wrong types and impossible values are refused with the file and key named; nothing is
guessed. Defaults follow PAPER.md per stage (``STAGE_DEFAULTS``): stage 1 full parameters at lr 1e-5;
stages 2 and 3 LoRA rank 16 at lr 2e-4, temperature 0.03; stage 3 up to 12 judged hard negatives.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("1", "2", "3", "reranker")
#: Which hard negatives a contrastive stage reads from pairs.
NEGATIVE_MODES = ("auto", "none", "mined", "judged")
BATCHING = ("subset", "mixed")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
#: Settings that change how a run executes but not what it computes: a resumed run may change them.
RUNTIME_KEYS = frozenset(
    {"device", "save_every", "keep_checkpoints", "progress", "output", "log_every", "input_cache"}
)
#: The language model's linear layers (Qwen2 names): LoRA's default targets. The vision tower stays
#: frozen, as in the paper's LoRA stages.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class ConfigError(ValueError):
    """A training config that cannot be run as written."""


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = LORA_TARGETS


@dataclass
class TinySettings:
    """Sizes of the from-scratch model (see ``training.tiny.build_tiny``)."""

    hidden_size: int = 64
    num_layers: int = 2
    image_size: int = 64
    patch_size: int = 2
    vocab_size: int = 1024
    layer_scale: float = 0.1  # the vision tower's residual-branch scale at init (InternViT: 0.1)
    seed: int = 0


@dataclass
class TrainConfig:
    stage: str
    data: list[str]
    output: str
    init: str | None = None
    tiny: TinySettings | None = None
    tokens_per_tile: int | None = None
    lora: LoraSettings | None = None
    #: Train everything but the vision tower (its weights stay the init's). For a judge started from
    #: an embedder that already sees the images: it learns to compare, and cannot unlearn to see.
    freeze_vision: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    mini_batch: int = 8
    temperature: float = 0.03
    negatives: str = "auto"
    num_negatives: int = 2
    negatives_per_positive: int = 1  # reranker: "no" examples per gold "yes", in the same step
    batching: str = "subset"
    max_units_per_subset: int | None = None
    subsets: list[str] | None = None
    max_text_chars: int = 2000
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    trust_remote_code: bool = False
    #: Where prepared model inputs (image tiles, token ids) are kept between steps, stages and runs:
    #: ``auto`` is ``OUTPUT/../cache/inputs`` (beside the run's other steps), ``off`` runs the
    #: processor on every batch, anything else is a directory (training/input_cache.py).
    input_cache: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the manifest

    # -- derived

    @property
    def contrastive(self) -> bool:
        return self.stage in ("2", "3")

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: PAPER.md's settings per stage; a key the YAML leaves out takes these before the dataclass default.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "1": {"lr": 1e-5, "lora": None},
    "2": {"lr": 2e-4, "lora": {}, "negatives": "auto", "num_negatives": 2},
    "3": {"lr": 2e-4, "lora": {}, "negatives": "judged", "num_negatives": 12},
    "reranker": {"lr": 1e-4, "lora": None},
}


def _check_type(where: str, key: str, value: Any, kind: Any) -> None:
    """Refuse a value of the wrong kind (bool is not an int, an int is a float)."""
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }.get(kind)
    if ok is False:
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for key, value in raw.items():
        declared = str(fields[key].type).removesuffix(" | None")
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(declared)
        if value is not None and kind is not None:
            _check_type(where, key, value, kind)
    return cls(**raw)


def config_from_dict(raw: dict[str, Any], where: str = "config", **overrides: Any) -> TrainConfig:
    """A checked ``TrainConfig`` from a mapping (a parsed YAML file), overrides applied last."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    stage = str(raw.get("stage", ""))
    if stage not in STAGES:
        raise ConfigError(f"{where}: stage must be one of {', '.join(STAGES)}, got {raw.get('stage')!r}")
    raw = {**STAGE_DEFAULTS[stage], **raw, "stage": stage}
    data = raw.get("data")
    if isinstance(data, str):
        raw["data"] = [data]
    if not raw.get("data") or not all(isinstance(d, str) for d in raw["data"]):
        raise ConfigError(f"{where}: data must name one or more dataset directories")
    if not isinstance(raw.get("output"), str) or not raw["output"]:
        raise ConfigError(f"{where}: output must name the run directory for checkpoints")
    raw["lora"] = _build(LoraSettings, raw.get("lora"), f"{where}: lora")
    raw["tiny"] = _build(TinySettings, raw.get("tiny"), f"{where}: tiny")
    config = _build(TrainConfig, raw, where)
    _check_values(config, where)
    return config


def _check_values(c: TrainConfig, where: str) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {message}")

    need(c.init is not None or c.tiny is not None, "give init (a checkpoint or model directory) or tiny")
    need(c.init is None or c.tiny is None, "give init or tiny, not both")
    need(c.lr > 0, f"lr must be > 0, got {c.lr}")
    need(0 <= c.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
    need(c.epochs > 0, f"epochs must be > 0, got {c.epochs}")
    need(c.max_steps is None or c.max_steps > 0, f"max_steps must be > 0, got {c.max_steps}")
    need(c.batch_size >= 1 and c.mini_batch >= 1, "batch_size and mini_batch must be >= 1")
    need(c.temperature > 0, f"temperature must be > 0, got {c.temperature}")
    need(c.negatives in NEGATIVE_MODES, f"negatives must be one of {', '.join(NEGATIVE_MODES)}")
    need(c.num_negatives >= 0, "num_negatives must be >= 0")
    need(c.negatives_per_positive >= 1, "negatives_per_positive must be >= 1")
    need(c.batching in BATCHING, f"batching must be one of {', '.join(BATCHING)}")
    need(c.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
    need(c.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
    need(c.save_every >= 1 and c.keep_checkpoints >= 1, "save_every and keep_checkpoints must be >= 1")
    need(not c.trust_remote_code, "trust_remote_code: assay loads transformers-native models only")
    need(bool(c.input_cache), "input_cache must be auto, off, or a directory")
    if c.lora is not None:
        need(c.lora.rank >= 1 and c.lora.alpha > 0, "lora rank and alpha must be positive")


def load_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Read and check a YAML config; relative paths in it are taken from the current directory."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is read, no tags): {e}") from None
    return config_from_dict(raw if raw is not None else {}, str(path), **overrides)
