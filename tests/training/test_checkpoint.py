"""Checkpoints: atomic, hashed, pickle-free, and resumable to the same parameters."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from assay.curation.dataset import TMP_PREFIX  # noqa: E402
from assay.training.checkpoint import (  # noqa: E402
    MANIFEST_FILE,
    STATE_TENSORS_FILE,
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    verify_checkpoint,
    weights_hash,
)
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

TEXTS = [
    "Find an image that matches the given description.",
    "what colour is the shape? red blue green circle square triangle",
    "a small red circle on a white background",
]
ROWS = [{"instruction": "Find it.", "text": t, "image": None} for t in TEXTS]
CONFIG = {"stage": "contrastive", "lr": 1e-3, "batch_size": 3, "seed": 0}


def tiny_embedder() -> MMEmbedder:
    model, processor = build_tiny(TEXTS, tokens_per_tile=64, num_layers=1)
    return MMEmbedder(model, processor)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    emb = tiny_embedder()
    path = tmp_path_factory.mktemp("run") / checkpoint_name(10)
    manifest = save_checkpoint(path, emb, stage="contrastive", step=10, training_config=CONFIG)
    return emb, path, manifest


def test_round_trip_same_embeddings_and_hash(saved, tmp_path):
    emb, path, manifest = saved
    assert (path / MANIFEST_FILE).is_file() and (path / "model.safetensors").is_file()
    assert manifest.step == 10 and manifest.stage == "contrastive"
    assert manifest.weights_sha256 == weights_hash(path)
    names = {f["name"] for f in manifest.files}
    assert {"model.safetensors", "config.json", "training_config.json", STATE_TENSORS_FILE} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)

    loaded, state = load_checkpoint(path)
    assert state.training_config == CONFIG and state.step == 10 and state.rng is not None
    assert torch.equal(emb.encode_queries(ROWS), loaded.encode_queries(ROWS))
    # saving the loaded embedder again gives the same bytes, hence the same cache key
    again = save_checkpoint(tmp_path / "again", loaded, stage="contrastive", step=10, training_config=CONFIG)
    assert again.weights_sha256 == manifest.weights_sha256
    assert again.parent is None


def test_hash_changes_with_one_weight(saved, tmp_path):
    emb, path, manifest = saved
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        next(loaded.parameters()).view(-1)[0] += 1e-3
    changed = save_checkpoint(tmp_path / "c", loaded, stage="s", step=11, training_config={}, parent=path)
    assert changed.weights_sha256 != manifest.weights_sha256
    assert changed.parent == manifest.weights_sha256


def test_verify_detects_tampering(saved, tmp_path):
    import shutil

    _, path, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    verify_checkpoint(copy)
    config = json.loads((copy / "training_config.json").read_text())
    config["lr"] = 1.0
    (copy / "training_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="training_config.json"):
        verify_checkpoint(copy)

    shutil.rmtree(copy)
    shutil.copytree(path, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(copy)


def test_pickle_file_refused(saved, tmp_path):
    import shutil

    _, path, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    torch.save({"x": torch.zeros(1)}, copy / "model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.bin.*--allow-pickle"):
        load_checkpoint(copy)
    # allowed, it is no longer refused as pickle; the manifest still flags the unlisted file
    with pytest.raises(CheckpointError, match="model.bin is not in the manifest"):
        load_checkpoint(copy, allow_pickle=True)
    loaded, _ = load_checkpoint(copy, allow_pickle=True, verify=False)
    assert isinstance(loaded, MMEmbedder)


def _train(emb, opt, sched, steps):
    emb.train()
    for _ in range(steps):
        q = emb.embed(ROWS, "query")
        c = emb.embed(ROWS, "candidate")
        noise = torch.randn(q.shape[0]) * 0.01  # the RNG must be restored too
        logits = q @ c.T / 0.05 + noise[:, None]
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _optim(emb):
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return opt, sched


def test_resume_gives_same_parameters(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    emb = tiny_embedder()
    opt, sched = _optim(emb)
    _train(emb, opt, sched, 3)
    path = tmp_path / checkpoint_name(3)
    save_checkpoint(
        path, emb, stage="contrastive", step=3, training_config=CONFIG, optimizer=opt, scheduler=sched
    )
    _train(emb, opt, sched, 2)
    expected = {k: v.clone() for k, v in emb.state_dict().items()}

    torch.manual_seed(123)  # the restore must undo this
    resumed, state = load_checkpoint(path)
    opt2, sched2 = _optim(resumed)
    restore_training_state(opt2, sched2, state)
    assert sched2.last_epoch == 3 and state.optimizer is not None
    _train(resumed, opt2, sched2, 2)
    got = resumed.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 5


def test_latest_checkpoint(tmp_path, saved):
    import shutil

    _, path, _ = saved
    assert latest_checkpoint(tmp_path / "none") is None
    run = tmp_path / "run"
    run.mkdir()
    assert latest_checkpoint(run) is None
    for step in (5, 40, 120):
        shutil.copytree(path, run / checkpoint_name(step))
    # a save killed mid-way: hidden, never a candidate even with a higher step
    shutil.copytree(path, run / f"{TMP_PREFIX}{checkpoint_name(200)}-999")
    # a complete-looking folder with a broken manifest is skipped
    shutil.copytree(path, run / checkpoint_name(300))
    (run / checkpoint_name(300) / MANIFEST_FILE).unlink()
    # one whose weights were damaged is skipped too
    shutil.copytree(path, run / checkpoint_name(250))
    (run / checkpoint_name(250) / "model.safetensors").write_bytes(b"xx")
    assert latest_checkpoint(run) == run / checkpoint_name(120)


def test_save_refuses_existing_and_overwrites(saved, tmp_path):
    emb, _, _ = saved
    path = tmp_path / checkpoint_name(1)
    save_checkpoint(path, emb, stage="s", step=1, training_config={})
    with pytest.raises(FileExistsError):
        save_checkpoint(path, emb, stage="s", step=1, training_config={})
    m = save_checkpoint(path, emb, stage="s", step=2, training_config={}, overwrite=True)
    assert verify_checkpoint(path).step == m.step == 2
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(1)]


def test_model_id_names_the_weights_not_the_optimizer_state(tmp_path):
    """Two runs that end with the same weights are one model for the judge and embedding caches."""
    from assay.curation.judge.scoring import TRAINER_STATE_FILE, model_id_for

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ckpt" / TRAINER_STATE_FILE).write_bytes(b"adam state, run 1")
    before = model_id_for(tmp_path / "ckpt")
    (tmp_path / "ckpt" / TRAINER_STATE_FILE).write_bytes(b"adam state, run 2")
    assert model_id_for(tmp_path / "ckpt") == before
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"other weights")
    assert model_id_for(tmp_path / "ckpt") != before
