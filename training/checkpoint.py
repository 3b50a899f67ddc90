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

On object storage (a run folder given as ``s3://...``), a checkpoint is written locally as above and
then published (``publish_checkpoint``): its files put whole, then a ``_committed.json`` marker
last, which plays the rename's part; readers require the marker, and ``local_checkpoint(uri)``
gives any reader (eval, mine, the judge, a resumed run) a verified local copy, cached per machine.
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
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from assay.curation import storage
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
    CPU (``optimizer.load_state_dict`` moves them to the parameters' device). A checkpoint URI
    is read from its local copy (:func:`local_checkpoint`).
    """
    path = local_checkpoint(path, allow_pickle=allow_pickle)
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


# ---------------------------------------------------------------- checkpoints on object storage
#
# Object stores have no rename, so a checkpoint is published to a URI file by file (each object is
# put whole: one PUT, or a multipart upload that appears on completion) and then ``_committed.json``
# is put last: the marker plays the rename's part. A reader of a checkpoint URI trusts nothing
# without it, and downloads only the files the manifest lists; replacing or deleting a published
# checkpoint removes the marker first. The marker names the manifest by its sha256, so its bytes
# identify the checkpoint's content: the local copy readers get (``local_checkpoint``) is cached
# under their hash.

#: The object put last when a checkpoint is published to a URI: it exists once the checkpoint does.
COMMIT_MARKER = "_committed.json"
#: Folder of the cache root holding local copies of checkpoints read from URIs.
CHECKPOINT_CACHE = "checkpoints"
_MARKER_FORMAT = "assay-checkpoint-commit"


def commit_marker(path: str | os.PathLike) -> bytes:
    """The marker bytes that commit the (local, complete) checkpoint ``path`` once published: what
    its manifest says, and the manifest's sha256. The same checkpoint gives the same bytes."""
    path = Path(path)
    manifest_bytes = (path / MANIFEST_FILE).read_bytes()
    manifest = read_manifest(path)
    marker = {
        "format": _MARKER_FORMAT,
        "stage": manifest.stage,
        "step": manifest.step,
        "weights_sha256": manifest.weights_sha256,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "files": len(manifest.files) + 1,
        "bytes": sum(int(e["bytes"]) for e in manifest.files) + len(manifest_bytes),
    }
    return (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode()


def _read_marker(uri: str | os.PathLike) -> tuple[bytes, dict[str, Any]] | None:
    """The commit marker of the checkpoint at ``uri`` (its bytes and what they say); None without one."""
    loc = storage.path(uri) / COMMIT_MARKER
    try:
        data = loc.read_bytes()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
        if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
            raise ValueError(f"format is not {_MARKER_FORMAT}")
        int(marker["step"]), str(marker["manifest_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{storage.display(loc)} is not a checkpoint commit marker: {e}") from None
    return data, marker


def is_committed(uri: str | os.PathLike) -> bool:
    """True when the checkpoint at ``uri`` (a URI) carries its commit marker: its upload finished."""
    return _read_marker(uri) is not None


def publish_checkpoint(path: str | os.PathLike, uri: str | os.PathLike) -> bytes:
    """Copy the complete local checkpoint ``path`` to the URI ``uri`` so that no reader ever sees
    half of it: what was at ``uri`` is uncommitted (its marker deleted) and removed, every file is
    put whole, ``checkpoint.json`` after the others, and the commit marker last. Returns the marker's
    bytes (they key the checkpoint in ``local_checkpoint``'s cache)."""
    path, dest = Path(path), storage.path(uri)
    marker = commit_marker(path)
    storage.remove_file(dest / COMMIT_MARKER)  # uncommitted first: nobody trusts what follows
    storage.put_tree(path, dest, last=[MANIFEST_FILE])  # what was there removed, each file whole
    storage.put_bytes(dest / COMMIT_MARKER, marker)
    log.info("published checkpoint %s to %s", path.name, storage.display(dest))
    return marker


def unpublish_checkpoint(uri: str | os.PathLike) -> None:
    """Delete the checkpoint at ``uri``: its marker first, so a reader never takes a half-deleted one."""
    storage.remove_file(storage.path(uri) / COMMIT_MARKER)
    storage.remove_tree(uri)


def committed_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, URI) of every committed ``step-NNNNNN`` checkpoint under the run folder URI, by step."""
    found = []
    for name in storage.names(run_dir):
        m = CHECKPOINT_NAME.match(name)
        if m and is_committed(storage.join(run_dir, name)):
            found.append((int(m.group(1)), storage.join(run_dir, name)))
    return sorted(found)


def checkpoint_cache_dir() -> Path:
    """Where ``local_checkpoint`` keeps its copies: ``<cache root>/checkpoints``."""
    from assay.curation.sqlite_cache import cache_root

    return cache_root() / CHECKPOINT_CACHE


def cached_checkpoint_path(marker: bytes, name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint committed by ``marker`` is (or goes) in the cache: ``<key>/<name>``,
    keeping the checkpoint's own folder name (judge and mining ids are ``<name>@<weights hash>``)."""
    base = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    return base / hashlib.sha256(marker).hexdigest()[:24] / name


def adopt_into_cache(
    path: str | os.PathLike, marker: bytes, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Move the local checkpoint ``path`` (just published with ``marker``) into the cache that
    ``local_checkpoint`` reads, instead of downloading it again later; returns where it is now."""
    path = Path(path)
    dest = cached_checkpoint_path(marker, path.name, cache_dir)
    if dest.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(path, ignore_errors=True)
    return dest


def local_checkpoint(
    uri: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding the checkpoint ``uri``: ``uri`` itself when it is a local path, else
    a verified copy in ``<cache root>/checkpoints/<key>/<name>``, downloaded once per machine.

    The checkpoint must be committed (its ``_committed.json`` marker there: an upload in progress or
    killed is refused), ``<key>`` is a hash of the marker's bytes (so a replaced checkpoint is a new
    copy and an unchanged one is fetched once), only the files its manifest lists are fetched, and
    every one is checked against the manifest's sha256 before the copy is renamed into place whole
    (two processes fetching at once both end with one complete folder). A checkpoint holding pickle
    files is refused unless ``allow_pickle`` (``curation.safety``); so is one whose listing holds a
    file the manifest does not name (a planted ``model.bin``), as ``verify_checkpoint`` refuses it.
    """
    from assay.curation.safety import ALLOW_ENV, PICKLE_SUFFIXES

    if not storage.is_remote(uri):
        return storage.path(uri)
    loc = storage.path(uri)
    shown = storage.display(loc)
    found = _read_marker(loc)
    if found is None:
        raise CheckpointError(
            f"checkpoint {shown} has no {COMMIT_MARKER}: not a committed checkpoint (its upload has "
            "not finished, was killed, or it was not published by assay: put a local checkpoint on "
            "object storage with assay.training.checkpoint.publish_checkpoint(path, uri))"
        )
    marker, info = found
    dest = cached_checkpoint_path(marker, loc.name or "checkpoint", cache_dir)
    if dest.is_dir():
        return dest
    manifest_bytes = (loc / MANIFEST_FILE).read_bytes()
    if hashlib.sha256(manifest_bytes).hexdigest() != info["manifest_sha256"]:
        raise CheckpointError(
            f"checkpoint {shown}: {MANIFEST_FILE} is not the one its {COMMIT_MARKER} commits "
            "(being replaced right now?)"
        )
    manifest = CheckpointManifest.from_json(json.loads(manifest_bytes))
    listed = sorted(e["name"] for e in manifest.files)
    present = set(storage.files_under(loc)) - {MANIFEST_FILE, COMMIT_MARKER}
    extra = sorted(present - set(listed))
    if extra:
        raise CheckpointError(f"checkpoint {shown}: file {extra[0]} is not in the manifest (added later?)")
    allowed = allow_pickle or os.environ.get(ALLOW_ENV, "") not in ("", "0")
    pickled = [n for n in listed if os.path.splitext(n)[1].lower() in PICKLE_SUFFIXES]
    if pickled and not allowed:
        raise UnsafeCheckpointError(
            f"checkpoint {shown} holds pickle files ({', '.join(pickled[:5])}), which can run arbitrary "
            "code when loaded; refusing. Use safetensors weights, or run `assay --allow-pickle ...` "
            "(ASSAY_ALLOW_PICKLE=1) only if you trust where they came from"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in listed:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = loc / name
            src.fs.get_file(src.path, str(target))
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
        refuse_pickle(tmp, allow_pickle, what="checkpoint", error=UnsafeCheckpointError)
        try:
            verify_checkpoint(tmp)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {shown}: {str(e).split(': ', 1)[-1]}") from None
        try:
            os.rename(tmp, dest)  # the whole copy appears at once
        except OSError:
            if not dest.is_dir():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("checkpoint %s: local copy %s", shown, dest)
    return dest


def local_model_path(uri: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """A local folder holding the model directory ``uri``: itself when local; for a URI, an assay
    checkpoint (it has a ``checkpoint.json`` or a commit marker) through :func:`local_checkpoint`
    (committed and verified, or refused), any other model directory (a pretrained one, which has no
    manifest to check) through ``curation.remote_model.local_model_dir``."""
    if not storage.is_remote(uri):
        return storage.path(uri)
    loc = storage.path(uri)
    if (loc / COMMIT_MARKER).is_file() or (loc / MANIFEST_FILE).is_file():
        return local_checkpoint(uri, allow_pickle=allow_pickle)
    from assay.curation.remote_model import local_model_dir

    return local_model_dir(uri, allow_pickle=allow_pickle)
