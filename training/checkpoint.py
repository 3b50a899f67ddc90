"""Training checkpoints: whole-model directories, written atomically, hashed, and resumable.

A checkpoint is a directory (``step-000120`` under the run directory) holding::

    model.safetensors (or shards + index)   the embedder, via MMEmbedder.save_pretrained
    config.json, tokenizer*, processor*     ... with its config, tokenizer and image processor
    assay_embedder.json                     ... and the embedder's own settings
    training_config.json                    the resolved training config of the run
    trainer_state.safetensors               optimizer / scheduler tensors and RNG states
    trainer_state.json                      their non-tensor state (tensors referenced by key)
    checkpoint.json                         the manifest, written last

Nothing is pickled: the optimizer's and scheduler's ``state_dict`` are split into tensors
(safetensors) and a JSON skeleton, and the RNG states are stored as uint8 / int64 tensors. The
manifest records the stage and step, the code version, the parent's weights hash, a sha256 per file
and ``weights_sha256``: sha256 over the bytes of the weight ``*.safetensors`` files (all but
``trainer_state.safetensors``) in sorted name order, which is what ``weights_hash`` computes and
what mining keys its embedding cache on.

``save_checkpoint`` builds the directory under a hidden sibling name and renames it into place, so
a reader sees the old checkpoint or the new one, never half of one. ``load_checkpoint`` refuses a
directory holding pickle files (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) unless
``allow_pickle=True`` (and transformers then reads them with ``torch.load(weights_only=True)``); it
never runs remote code. Resume::

    ckpt = latest_checkpoint(run_dir)
    embedder, state = load_checkpoint(ckpt)
    optimizer, scheduler = build_optimizer(embedder), build_scheduler(...)   # same order as before
    restore_training_state(optimizer, scheduler, state)                       # then continue at state.step
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from assay.curation.dataset import atomic_write_json, code_version, commit_dir, fingerprint, staging_dir
from assay.curation.judge.scoring import TRAINER_STATE_FILE, weights_sha256
from assay.curation.safety import UnsafeModelError, refuse_pickle
from assay.training.model import MMEmbedder, load_embedder

log = logging.getLogger(__name__)

MANIFEST_FILE = "checkpoint.json"
TRAINING_CONFIG_FILE = "training_config.json"
STATE_TENSORS_FILE = TRAINER_STATE_FILE
STATE_JSON_FILE = "trainer_state.json"
#: A LoRA run's adapter (peft's own files, safetensors), beside the merged weights.
ADAPTER_DIR = "adapter"
#: Hidden prefix of a checkpoint being written (not ``.tmp-``: curation's sweeper unlinks files).
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
SCHEMA_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, tampered with, or not in assay's format."""


class UnsafeCheckpointError(CheckpointError, UnsafeModelError):
    """A checkpoint holding pickle files, refused without ``allow_pickle=True``."""


@dataclass
class CheckpointManifest:
    """What ``checkpoint.json`` says: where in training, which code, and the hash of every file."""

    stage: str
    step: int
    weights_sha256: str
    files: list[dict[str, Any]] = field(default_factory=list)  # [{name, sha256, bytes}], sorted
    parent: str | None = None  # weights_sha256 of the checkpoint (or pretrained model) trained from
    training_config_fingerprint: str = ""
    has_optimizer: bool = False
    has_scheduler: bool = False
    has_rng: bool = False
    created: str = ""
    code_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CheckpointManifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class TrainingState:
    """Everything but the model that resuming needs; ``restore_training_state`` applies it."""

    manifest: CheckpointManifest
    training_config: dict[str, Any]
    optimizer: dict[str, Any] | None = None  # an optimizer state_dict (tensors on the CPU)
    scheduler: dict[str, Any] | None = None  # a scheduler state_dict
    rng: dict[str, Any] | None = None  # {"python", "numpy", "torch", "cuda"}

    @property
    def stage(self) -> str:
        return self.manifest.stage

    @property
    def step(self) -> int:
        return self.manifest.step


def checkpoint_name(step: int) -> str:
    """``step-000120``: zero-padded so names sort as steps do."""
    return f"step-{step:06d}"


# ---------------------------------------------------------------- hashing


def _sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the weight ``*.safetensors`` files' bytes, in sorted name order.

    Computed from the bytes on disk, never read from the manifest, so it works on any model
    directory (a pretrained InternVL too) and cannot go stale. The trainer state is not weights.
    """
    try:
        return weights_sha256(path, exclude=(STATE_TENSORS_FILE,))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _file_entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        if name == MANIFEST_FILE:
            continue
        entries.append({"name": name, "sha256": _sha256_file(file), "bytes": file.stat().st_size})
    return entries


def read_manifest(path: str | os.PathLike) -> CheckpointManifest:
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: not a complete assay checkpoint")
    try:
        return CheckpointManifest.from_json(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid checkpoint manifest: {e}") from e


def verify_checkpoint(path: str | os.PathLike) -> CheckpointManifest:
    """Recompute every hash; raise ``CheckpointError`` naming the first file that disagrees.

    A file listed but missing, a file whose sha256 changed, and a file present but not listed (a
    planted ``model.bin``, say) are all errors. Returns the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path)
    listed = {e["name"]: e for e in manifest.files}
    present = {e["name"]: e for e in _file_entries(path)}
    for name, entry in listed.items():
        if name not in present:
            raise CheckpointError(f"checkpoint {path}: file {name} is listed in the manifest but missing")
        if present[name]["sha256"] != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} has sha256 {present[name]['sha256']}, "
                f"the manifest says {entry['sha256']}: it was modified or is corrupt"
            )
    extra = sorted(set(present) - set(listed))
    if extra:
        raise CheckpointError(f"checkpoint {path}: file {extra[0]} is not in the manifest (added later?)")
    actual = weights_hash(path)
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"checkpoint {path}: weights hash {actual} differs from the manifest's {manifest.weights_sha256}"
        )
    return manifest


# ---------------------------------------------------------------- state dicts without pickle


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``obj``; tensors go to ``tensors`` under ``key`` and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store a {type(k).__name__} key at {key}")
            items.append([k, _encode(v, f"{key}.{k}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(
        f"cannot checkpoint {type(obj).__name__} at {key} without pickle; "
        "keep optimizer/scheduler state to tensors, numbers, strings, lists and dicts"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if initialised) CUDA generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "state", tensors)
    save_file(tensors, path / STATE_TENSORS_FILE, metadata={"format": "assay-trainer-state"})
    (path / STATE_JSON_FILE).write_text(json.dumps(skeleton, indent=1) + "\n")


def _load_trainer_state(path: Path) -> dict[str, Any]:
    if not (path / STATE_JSON_FILE).is_file():
        return {}
    tensors = load_file(path / STATE_TENSORS_FILE)
    return _decode(json.loads((path / STATE_JSON_FILE).read_text()), tensors)


# ---------------------------------------------------------------- save


def _whole(embedder: MMEmbedder) -> MMEmbedder:
    """The embedder as a whole model: a LoRA-wrapped one merged on a copy, else itself."""
    if not hasattr(embedder.model, "get_base_model"):
        return embedder
    merged = copy.deepcopy(embedder.model).merge_and_unload()
    return MMEmbedder(
        merged,
        embedder.processor,
        max_tiles=embedder.max_tiles,
        padding_side=embedder.padding_side,
        image_root=embedder.image_root,
    )


def save_checkpoint(
    path: str | os.PathLike,
    embedder: MMEmbedder,
    *,
    stage: str,
    step: int,
    training_config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = True,
    parent: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume_key: dict[str, Any] | None = None,
) -> CheckpointManifest:
    """Write a complete checkpoint at ``path`` atomically; returns its manifest.

    Everything is written into ``.tmp-<name>-<pid>`` beside ``path`` and renamed into place
    (``curation.dataset.staging_dir`` / ``commit_dir``), so a crash leaves the previous checkpoints
    intact and a hidden folder that ``latest_checkpoint`` ignores (and the trainer clears). ``parent`` is the weights hash of the
    model this training started from, or a model directory to hash. An existing ``path`` is
    refused unless ``overwrite``; replacing it swaps two renames, so for an instant neither is
    there (a reader then finds the previous step). ``resume_key`` is the part of the config a
    resumed run must match (its fingerprint is stored); default the whole config.

    A peft (LoRA) model is saved merged, as a whole model any reader can load, and its adapter
    under ``adapter/`` (peft's safetensors files) for resuming. The merge is done on a copy, so
    the training model is not touched (merging and unmerging in place would round the weights).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if parent is not None and Path(parent).is_dir():
        parent = weights_hash(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _whole(embedder).save_pretrained(tmp)
        if hasattr(embedder.model, "get_base_model"):
            embedder.model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        atomic_write_json(tmp / TRAINING_CONFIG_FILE, training_config)
        trainer_state: dict[str, Any] = {}
        if optimizer is not None:
            trainer_state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            trainer_state["scheduler"] = scheduler.state_dict()
        if rng:
            trainer_state["rng"] = capture_rng()
        _save_trainer_state(tmp, trainer_state)
        manifest = CheckpointManifest(
            stage=stage,
            step=int(step),
            weights_sha256=weights_hash(tmp),
            files=_file_entries(tmp),
            parent=str(parent) if parent is not None else None,
            training_config_fingerprint=fingerprint(
                resume_key if resume_key is not None else training_config
            ),
            has_optimizer=optimizer is not None,
            has_scheduler=scheduler is not None,
            has_rng=rng,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            code_version=code_version(),
        )
        atomic_write_json(tmp / MANIFEST_FILE, manifest.to_json())
        commit_dir(tmp, path)
    except BaseException:
        # A full disk, say: nothing half-written stays (a checkpoint being replaced comes back).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("checkpoint %s: stage %s step %d weights %s", path, stage, step, manifest.weights_sha256[:12])
    return manifest


# ---------------------------------------------------------------- load and resume


def load_checkpoint(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    verify: bool = True,
) -> tuple[MMEmbedder, TrainingState]:
    """The embedder and the training state of a checkpoint; remote code is never run.

    A directory holding pickle files is refused unless ``allow_pickle`` (transformers then reads
    them with ``torch.load(weights_only=True)``; assay's own state is never pickled). ``verify``
    rehashes every file first. The embedder comes back in eval mode; the state's tensors are on the
    CPU (``optimizer.load_state_dict`` moves them to the parameters' device).
    """
    path = Path(path)
    refuse_pickle(path, allow_pickle, what="checkpoint", error=UnsafeCheckpointError)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    embedder = load_embedder(path, trust_remote_code=False, device=device, allow_pickle=allow_pickle)
    config_file = path / TRAINING_CONFIG_FILE
    training_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    trainer_state = _load_trainer_state(path)
    state = TrainingState(
        manifest=manifest,
        training_config=training_config,
        optimizer=trainer_state.get("optimizer"),
        scheduler=trainer_state.get("scheduler"),
        rng=trainer_state.get("rng"),
    )
    return embedder, state


def restore_training_state(
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: TrainingState,
    *,
    rng: bool = True,
) -> None:
    """Put the optimizer, scheduler and RNGs back where the checkpoint left them.

    Build ``optimizer`` over the loaded embedder's parameters in the same groups and order as the
    original run (state is matched by position), and the scheduler over that optimizer, then call
    this; training from ``state.step`` on gives the parameters an uninterrupted run would have.
    """
    if optimizer is not None:
        if state.optimizer is None:
            raise CheckpointError("the checkpoint holds no optimizer state")
        optimizer.load_state_dict(state.optimizer)
    if scheduler is not None:
        if state.scheduler is None:
            raise CheckpointError("the checkpoint holds no scheduler state")
        scheduler.load_state_dict(state.scheduler)
    if rng and state.rng is not None:
        restore_rng(state.rng)


def latest_checkpoint(run_dir: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The highest-step complete checkpoint (``step-NNNNNN``) under ``run_dir``, else None.

    Hidden folders (a ``.tmp-`` save a crash left) are never candidates; a candidate without a
    manifest, or (with ``verify``) whose hashes do not check out, is skipped with a warning.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir():
            candidates.append((int(m.group(1)), p))
    for _, p in sorted(candidates, reverse=True):
        try:
            verify_checkpoint(p) if verify else read_manifest(p)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", p, e)
            continue
        return p
    return None
