"""Model directories that pickle would read are refused unless the user says otherwise.

``torch.load`` and ``pickle`` can run arbitrary code hidden in a file, so a model directory holding
such files (``pytorch_model.bin``, ``*.pt``, ...) is refused by every loader in assay (the judge's
backends, the encoders, the embedder and the trainer's ``init``) unless the caller passes
``allow_pickle=True`` or the user opts in for the run (``assay --allow-pickle COMMAND``, which sets
``ASSAY_ALLOW_PICKLE=1``; the variable also works on its own). assay itself only writes safetensors
and JSON. A hub id that is not a local directory has nothing to inspect
here, and assay never downloads anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The user's opt-in for a whole run (set by ``assay --allow-pickle``).
ALLOW_ENV = "ASSAY_ALLOW_PICKLE"
#: Suffixes of files that torch / pickle would execute code to read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeModelError(ValueError):
    """A model directory holding pickle files, refused without ``allow_pickle``."""


def pickle_files(path: str | os.PathLike) -> list[Path]:
    """Files under ``path`` that only pickle can read."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickle(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    *,
    what: str = "model directory",
    error=UnsafeModelError,
) -> None:
    """Raise ``error`` if the local directory ``path`` holds pickle files and ``allow_pickle`` is off."""
    if allow_pickle or os.environ.get(ALLOW_ENV, "") not in ("", "0") or not Path(path).is_dir():
        return
    found = pickle_files(path)
    if found:
        names = ", ".join(p.relative_to(path).as_posix() for p in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise error(
            f"{what} {path} holds pickle files ({names}{more}), which can run arbitrary code when "
            "loaded; refusing. Use safetensors weights, or run `assay --allow-pickle ...` "
            "(ASSAY_ALLOW_PICKLE=1) only if you trust where they came from"
        )
