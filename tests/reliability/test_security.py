"""Issue 7, point 3: what a model directory or a candidate's text may make assay do.

- A model directory holding pickle files is refused by every loader, from the command line, unless
  the user passes `assay --allow-pickle` (or ASSAY_ALLOW_PICKLE=1).
- Remote code stays off unless asked for (the loaders pass trust_remote_code=False; assay's own
  embedder refuses it outright).
- The judge's prompt-injection set runs here, in CI, against a reranker the toolkit trains in the
  test, and its flip rate is printed and written to $ASSAY_RELIABILITY_OUT (when set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch

from assay.curation.safety import UnsafeModelError, refuse_pickle

ROOT = Path(__file__).resolve().parents[2]


def _assay(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "assay.pipelines.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """A directory that looks like a model and holds a pickle file that would run code when loaded."""
    d = tmp_path_factory.mktemp("pickled")
    (d / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    marker = d / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (d / "modules.json").write_text("[]")
    return d, marker


@pytest.mark.parametrize(
    "argv",
    [
        ["judge", "{data}", "{out}", "--model", "{model}"],
        ["mine", "{data}", "{out}", "--encoder", "{model}"],
        ["eval", "{model}", "{data}", "--out", "{out}"],
    ],
    ids=["judge", "mine", "eval"],
)
def test_a_model_directory_with_pickle_files_is_refused_from_the_command_line(pickled_model, tmp_path, argv):
    from helpers.colours import colour_dataset

    model, marker = pickled_model
    data = colour_dataset(tmp_path / "ds")
    args = [a.format(data=data, out=tmp_path / "out", model=model) for a in argv]
    res = _assay(*args)
    assert res.returncode != 0, res.stdout
    assert "pickle" in res.stderr and "pytorch_model.bin" in res.stderr and "--allow-pickle" in res.stderr
    assert "Traceback" not in res.stderr
    assert not marker.exists()  # nothing was unpickled
    assert not (tmp_path / "out").exists()


def test_the_pickle_guard_and_the_users_opt_in(pickled_model, monkeypatch):
    model, _ = pickled_model
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin"):
        refuse_pickle(model)
    refuse_pickle(model, allow_pickle=True)  # the caller's explicit yes
    monkeypatch.setenv("ASSAY_ALLOW_PICKLE", "1")  # what `assay --allow-pickle` sets
    refuse_pickle(model)
    monkeypatch.setenv("ASSAY_ALLOW_PICKLE", "0")
    with pytest.raises(UnsafeModelError):
        refuse_pickle(model)


def test_allow_pickle_on_the_command_line_lets_the_load_go_on(pickled_model, tmp_path):
    """With --allow-pickle the refusal is gone: the load proceeds (and fails later on this fake model
    for its own reasons, which is not the pickle refusal)."""
    from helpers.colours import colour_dataset

    model, _ = pickled_model
    data = colour_dataset(tmp_path / "ds")
    res = _assay("--allow-pickle", "mine", str(data), str(tmp_path / "out"), "--encoder", str(model))
    assert "holds pickle files" not in res.stderr


def test_remote_code_is_off_unless_asked_for():
    """Every command that loads a model has --trust-remote-code, and it defaults to off."""
    from assay.pipelines.cli import cli

    for command in ("judge", "mine", "curate"):
        (flag,) = [p for p in cli.commands[command].params if p.name == "trust_remote_code"]
        assert flag.is_flag and not flag.get_default(click.Context(cli.commands[command])), command
    from assay.training.model import load_embedder

    with pytest.raises(ValueError, match="never runs remote code"):
        load_embedder("unused", trust_remote_code=True)


# -- the prompt-injection set, against a reranker trained here


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    from helpers.colours import TINY, colour_dataset

    from assay.training.config import config_from_dict
    from assay.training.trainer import train

    root = tmp_path_factory.mktemp("judge")
    colours = colour_dataset(root / "colours")
    quiet = {"progress": False, "save_every": 100}
    stage1 = train(
        config_from_dict(
            {
                "stage": "1",
                "data": [str(colours)],
                "output": str(root / "s1"),
                "tiny": TINY,
                "tokens_per_tile": 16,
                "lr": 3e-3,
                "batch_size": 8,
                "mini_batch": 8,
                "epochs": 8,
                **quiet,
            }
        )
    )
    final = train(
        config_from_dict(
            {
                "stage": "reranker",
                "data": [str(colours)],
                "output": str(root / "rr"),
                "init": str(stage1),
                "lr": 1e-2,
                "batch_size": 8,
                "mini_batch": 8,
                "epochs": 8,
                "subsets": ["vqa"],
                **quiet,
            }
        )
    )
    return final, colours


def test_the_injection_set_runs_against_a_trained_reranker_and_its_flip_rate_is_recorded(reranker):
    from assay.curation.dataset import Dataset
    from assay.curation.judge.prompts import load_prompt
    from assay.curation.judge.robustness import INJECTIONS, injection_flip_rate
    from assay.training.generative import Reranker
    from assay.training.model import load_embedder

    final, colours = reranker
    ds = Dataset(colours)
    rows = {
        t: [r for n in ds.shards(t) for r in ds.read_shard(t, n).to_pylist()] for t in ("queries", "corpus")
    }
    queries = [r for r in rows["queries"] if r["subset"] == "vqa"]
    docs = [r for r in rows["corpus"] if r["subset"] == "vqa"]
    pairs = [(q, d) for q in queries[:6] for d in docs[:4]]
    embedder = load_embedder(final).eval()
    embedder.image_root = str(ds.data_root)
    scorer = Reranker(embedder, batch_size=16).scorer
    with torch.no_grad():
        result = injection_flip_rate(scorer, load_prompt("vqa"), pairs)
    assert result.pairs == len(pairs) and result.judged == len(pairs) * len(INJECTIONS)  # every trial scored
    assert 0.0 <= result.flip_rate <= 1.0
    record = {
        "judge": "tiny reranker trained in the test (colours, stage 1 + reranker, 8 epochs each)",
        "pairs": result.pairs,
        "trials": result.judged,
        "flips": result.flips,
        "flips_to_yes": result.flips_to_yes,
        "flip_rate": result.flip_rate,
        "mean_p_yes_shift": result.mean_p_yes_shift,
    }
    print("injection flip rate:", json.dumps(record))
    out = os.environ.get("ASSAY_RELIABILITY_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "injection.json").write_text(json.dumps(record, indent=2))
