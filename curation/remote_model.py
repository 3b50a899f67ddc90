"""A model directory given as a URI (``s3://bucket/models/judge``): copied once to this machine.

Model loaders (transformers, vLLM, assay's own) read a local folder. A checkpoint on object storage
is copied (``curation.storage.local_copy``) to ``<cache root>/models/<key>/<name>``, where
``<name>`` is the directory's own name (so ``scoring.model_id_for``, ``<name>@<weights hash>``,
gives the same id as for a local copy) and ``<key>`` is a hash of the URI and of what the store says
about every file (relative name, size, ETag or modification time): a changed checkpoint gets a new
copy, an unchanged one is copied once per machine, and every process on a node (each judge actor)
shares it. The copy is written under a temporary name and renamed into place whole, so two processes
copying at once both end with one complete folder, and a killed copy leaves only a temporary folder
that nothing reads.

Only safetensors weights are taken: a directory holding pickle files (``*.bin``, ``*.pt``, ...) is
refused before anything is copied, as ``curation.safety`` refuses a local one (unless the user
allows pickle for the run). Copying code files changes nothing about ``trust_remote_code``, which
stays off unless the user turns it on.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from assay.curation import storage
from assay.curation.safety import ALLOW_ENV, PICKLE_SUFFIXES, UnsafeModelError
from assay.curation.sqlite_cache import cache_root

#: Folder of the cache root that holds the copies.
MODELS_DIR = "models"


def remote_files(location: str | os.PathLike, *, allow_pickle: bool = False) -> list[tuple[str, dict]]:
    """(relative name, the store's info) of every file of a model directory on a URI. ValueError
    when there is none; ``UnsafeModelError`` when one only pickle can read (see the module docs)."""
    files = storage.listing(location)
    if not files:
        raise ValueError(f"{storage.display(location)} is not a model directory (no files there)")
    allowed = allow_pickle or os.environ.get(ALLOW_ENV, "") not in ("", "0")
    pickled = [rel for rel, _ in files if posixpath.splitext(rel)[1].lower() in PICKLE_SUFFIXES]
    if pickled and not allowed:
        more = f" and {len(pickled) - 5} more" if len(pickled) > 5 else ""
        raise UnsafeModelError(
            f"model directory {storage.display(location)} holds pickle files ({', '.join(pickled[:5])}{more}), "
            "which can run arbitrary code when loaded; refusing. Use safetensors weights, or run "
            "`assay --allow-pickle ...` (ASSAY_ALLOW_PICKLE=1) only if you trust where they came from"
        )
    return files


def local_model_dir(
    location: str | os.PathLike, *, root: str | os.PathLike | None = None, allow_pickle: bool = False
) -> Path:
    """A local folder holding the model directory ``location``: itself when it is local, else its
    copy under ``root`` (default ``<cache root>/models``), made on first use (module docstring)."""
    if not storage.is_remote(location):
        return storage.path(location)
    remote_files(location, allow_pickle=allow_pickle)  # there, and nothing pickled in it
    return storage.local_copy(location, Path(root) if root is not None else cache_root() / MODELS_DIR)
