"""A stage run whose output is a URI (``s3://bucket/run/stage1``): trained in a local working folder,
every checkpoint published to the URI as it is written.

``training.trainer.train`` hands a run here when ``config.output`` is a URI. The loop is the same;
only where its files go differs:

- **Working folder**: ``<cache root>/train/<hash of the output's parent URI>/<output name>`` on the
  machine of each worker. Keyed by the URI, so a rerun on the same machine finds it; and the
  parent's hash keeps ``input_cache: auto`` (``OUTPUT/../cache/inputs``) shared by the stages of one
  run folder, as it is locally. The URI is the truth: the working folder is only a copy of it.
- **Publishing**: each checkpoint is saved locally (``save_checkpoint``: staged, renamed into place),
  then rank 0 puts ``train_log.jsonl`` at the URI, publishes the checkpoint
  (``checkpoint.publish_checkpoint``: every file put whole, the ``_committed.json`` marker last; the
  object-store analogue of the rename), and removes the URI's committed checkpoints beyond
  ``keep_checkpoints`` (marker first). ``complete.json`` is put once the final checkpoint is
  committed. A reader of the URI (``final_checkpoint``, ``local_checkpoint``, a resumed run) trusts a
  checkpoint only with its marker, so a kill at any moment leaves the last committed checkpoint
  readable and nothing half-written trusted.
- **Resume**: from the highest committed checkpoint at the URI (one whose files fail their hashes is
  skipped with a warning), whatever machine wrote it: rank 0 reuses its working folder's copy when
  it is that very checkpoint (same manifest) and downloads it otherwise; the other workers take it
  through ``local_checkpoint`` (a per-machine cache). Local checkpoints the URI does not hold
  committed (an upload a kill cut short) are deleted, and the log is the URI's, cut at the resumed
  step, so the rerun computes what an uninterrupted run would have.
- **Finish**: the final checkpoint moves into ``local_checkpoint``'s cache (an eval, mine or the
  next stage on this machine reads it without downloading it again) and the working folder is
  removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from assay.curation import storage
from assay.curation.dataset import atomic_write_bytes
from assay.curation.sqlite_cache import cache_root
from assay.training.checkpoint import (
    CHECKPOINT_NAME,
    COMMIT_MARKER,
    CheckpointError,
    adopt_into_cache,
    commit_marker,
    committed_checkpoints,
    local_checkpoint,
    publish_checkpoint,
    unpublish_checkpoint,
    verify_checkpoint,
)
from assay.training.config import TrainConfig

log = logging.getLogger(__name__)

#: Folder of the cache root holding the working folders of runs whose output is a URI.
WORK_DIR = "train"


def working_dir(uri: str | os.PathLike) -> Path:
    """The local working folder of the run whose output is ``uri`` (see the module docstring)."""
    loc = storage.path(uri)
    parent = str(loc.parent).rstrip("/")
    key = hashlib.sha256(parent.encode()).hexdigest()[:16]
    return cache_root() / WORK_DIR / key / (loc.name or "output")


@dataclass
class RemoteOutput:
    """Where a run on a URI stands: its URI, its local working folder and the local checkpoint it
    resumes from (None: from scratch). Rank 0 calls ``publish`` after each save, ``complete`` at the end."""

    uri: str
    work: Path
    resume: Path | None
    keep: int
    markers: dict[str, bytes] = field(default_factory=dict)  # checkpoint name -> its commit marker

    def publish(self, checkpoint: Path, log_file: Path) -> None:
        """The log, then the checkpoint (marker last), then the URI's older checkpoints pruned."""
        if log_file.is_file():
            storage.put_bytes(storage.join(self.uri, log_file.name), log_file.read_bytes())
        self.markers[checkpoint.name] = publish_checkpoint(
            checkpoint, storage.join(self.uri, checkpoint.name)
        )
        kept = {storage.path(u).name for _, u in committed_checkpoints(self.uri)[-self.keep :]}
        for name in storage.names(self.uri):
            if CHECKPOINT_NAME.match(name) and name not in kept:
                unpublish_checkpoint(storage.join(self.uri, name))

    def complete(self, final: Path, complete_file: Path) -> Any:
        """Put ``complete.json`` at the URI; the final checkpoint goes to the local checkpoint cache
        and the working folder away. Returns the final checkpoint's location at the URI."""
        storage.put_bytes(storage.join(self.uri, complete_file.name), complete_file.read_bytes())
        marker = self.markers.get(final.name) or commit_marker(final)
        adopt_into_cache(final, marker)
        shutil.rmtree(self.work, ignore_errors=True)
        return storage.path(self.uri) / final.name


def prepare(config: TrainConfig, rank: int, log_name: str) -> RemoteOutput:
    """Find where the run at ``config.output`` resumes, and (rank 0) make the working folder a copy
    of what the URI holds committed (module docstring)."""
    uri = storage.absolute(config.output).rstrip("/")
    work = working_dir(uri)
    resume: Path | None = None
    for _, ckpt_uri in reversed(committed_checkpoints(uri)):
        try:
            resume = _resume_copy(ckpt_uri, work, rank)
        except (CheckpointError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", storage.display(ckpt_uri), e)
            continue
        break
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        for p in work.iterdir():  # what the URI does not hold committed is not this run's state
            if p.name != (resume.name if resume is not None else None) and (
                CHECKPOINT_NAME.match(p.name) or p.name.startswith(".")
            ):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        (work / "complete.json").unlink(missing_ok=True)
        remote_log = storage.path(uri) / log_name
        if remote_log.is_file():
            atomic_write_bytes(work / log_name, remote_log.read_bytes())
        else:
            (work / log_name).unlink(missing_ok=True)
    return RemoteOutput(uri, work, resume, config.keep_checkpoints)


def _resume_copy(ckpt_uri: str, work: Path, rank: int) -> Path:
    """A local, verified copy of the committed checkpoint ``ckpt_uri`` to resume from: rank 0's is
    in its working folder (reused when it is that very checkpoint), the others' in the cache."""
    name = storage.path(ckpt_uri).name
    if rank != 0:
        return local_checkpoint(ckpt_uri)
    here = work / name
    marker = (storage.path(ckpt_uri) / COMMIT_MARKER).read_bytes()
    if here.is_dir():
        try:
            if commit_marker(here) == marker:
                verify_checkpoint(here)
                return here
        except CheckpointError:
            pass
        shutil.rmtree(here, ignore_errors=True)
    cached = local_checkpoint(ckpt_uri)
    work.mkdir(parents=True, exist_ok=True)
    try:  # hard links: the cache's files never change, and the copy costs no disk
        shutil.copytree(cached, here, copy_function=os.link)
    except OSError:
        shutil.rmtree(here, ignore_errors=True)
        shutil.copytree(cached, here)
    return here


def train_remote(config: TrainConfig, device: str | torch.device | None = None) -> Any:
    """``training.trainer.train`` for an output URI; returns the final checkpoint's location there."""
    from assay.training import trainer

    uri = storage.path(storage.absolute(config.output).rstrip("/"))
    done = trainer._completed_run(config, uri)
    if done is not None:
        return done
    rank, _ = trainer._world()
    remote = prepare(config, rank, trainer.LOG_FILE)
    run = trainer._set_up(config, remote.work, device, remote=remote)
    trainer._announce(run)
    trainer._loop(run)
    return trainer._finish(run)
