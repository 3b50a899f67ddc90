"""`train_distributed`: the trainer's loop on 2 Ray Train workers (gloo, CPU) reproduces one process.

Stage 1 sums token-weighted gradients over the workers, so 2 workers must give one process's weights
up to float rounding; stage 2 (LoRA, InfoNCE) runs from the stage-1 checkpoint; a worker's
``TrainingError`` comes back as a ``TrainingError`` with its message. Each Ray Train run costs
~25 s of worker start-up on 2 cores: the file makes three.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from assay.curation.dataset import write_dataset

pytestmark = pytest.mark.ray

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from assay.training.config import config_from_dict  # noqa: E402
from assay.training.trainer import TrainingError, final_checkpoint, train  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230)}
TINY = {"hidden_size": 32, "num_layers": 1, "image_size": 16, "patch_size": 1, "vocab_size": 300}
STAGE1 = {
    "stage": "1",
    "tiny": TINY,
    "tokens_per_tile": 16,
    "lr": 1e-2,  # steps far larger than the tolerance, so that a wrong gradient would show
    "batch_size": 8,
    "mini_batch": 4,
    "max_steps": 3,
    "save_every": 2,
    "progress": False,
}


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    """24 queries (a 16 px image in one of 3 colours, 8 shades each), answered by the colour's doc."""
    queries, pairs = [], []
    for i in range(24):
        name = list(COLOURS)[i % 3]
        shade = tuple(min(255, c + 4 * (i // 3)) for c in COLOURS[name])
        image = {"bytes": png(shade), "path": None}
        queries.append(
            {"query_id": f"q{i}", "subset": "colours", "task": "vqa", "text": "What colour?", "image": image}
        )
        pairs.append({"query_id": f"q{i}", "doc_id": f"d-{name}", "label": "positive"})
    corpus = [{"doc_id": f"d-{n}", "subset": "colours", "text": f"{n}", "image": None} for n in COLOURS]
    root = tmp_path_factory.mktemp("colours") / "ds"
    write_dataset(root, {"queries": queries, "corpus": corpus, "pairs": pairs})
    return str(root)


@pytest.fixture(scope="module")
def one_process(colours, tmp_path_factory) -> Path:
    """Stage 1 in this process: the reference run."""
    out = tmp_path_factory.mktemp("one") / "stage1"
    return train(config_from_dict({**STAGE1, "data": [colours], "output": str(out)}))


@pytest.fixture(autouse=True, scope="module")
def _prompt_polling():
    """Ray Train's controller polls its workers every 2 s; runs this short end sooner at 0.2 s."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        yield


def _log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_two_workers_reproduce_one_process(colours, one_process, tmp_path, ray_local, capsys):
    from assay.pipelines.train_ray import train_distributed

    out = tmp_path / "stage1"
    config = config_from_dict({**STAGE1, "data": [colours], "output": str(out)})
    final = train_distributed(config, num_workers=2)

    assert final == out / "step-000003" == final_checkpoint(out)
    err = capsys.readouterr().err
    assert "ray train: 2 workers, gloo" in err
    assert f"ray train: stage 1 trained by 2 workers -> {final}" in err  # the workers' own world size
    assert (out / ".ray-train").is_dir() and (out / "step-000002").is_dir()
    log, reference_log = _log(out), _log(one_process.parent)
    assert [e["step"] for e in log] == [1, 2, 3]
    for entry, ref in zip(log, reference_log, strict=True):
        assert entry["units"] == 8
        assert entry["loss"] == pytest.approx(ref["loss"], rel=1e-5)

    ours = safetensors_torch.load_file(final / "model.safetensors")
    reference = safetensors_torch.load_file(one_process / "model.safetensors")
    assert ours.keys() == reference.keys()
    diff = max(float((ours[k].float() - reference[k].float()).abs().max()) for k in ours)
    assert diff < 1e-4, f"2 workers differ from 1 process by {diff}"
    # ... while one step moves the weights far more than that: the comparison can fail
    step2 = safetensors_torch.load_file(one_process.parent / "step-000002" / "model.safetensors")
    moved = max(float((reference[k].float() - step2[k].float()).abs().max()) for k in reference)
    assert moved > 1e-3

    # a rerun of the complete stage returns it without starting any worker
    assert train_distributed(config, num_workers=2) == final
    assert "ray" not in capsys.readouterr().err


def test_contrastive_stage_from_the_stage1_checkpoint(colours, one_process, tmp_path, ray_local, monkeypatch):
    from assay.pipelines.train_ray import train_distributed

    monkeypatch.chdir(tmp_path)  # a relative output is the driver's, though Ray moves the workers
    out = Path("stage2")
    config = config_from_dict(
        {
            "stage": "2",
            "data": [colours],
            "output": "stage2",
            "init": str(one_process),
            "lora": {"rank": 4},
            "batch_size": 8,
            "mini_batch": 4,
            "max_steps": 2,
            "progress": False,
        }
    )
    final = train_distributed(config, num_workers=2)

    assert final == out / "step-000002" == final_checkpoint(out)
    assert (tmp_path / final / "adapter" / "adapter_model.safetensors").is_file()
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2]
    assert all(math.isfinite(e["loss"]) for e in log)


def test_worker_error_comes_back_as_training_error(colours, tmp_path, ray_local):
    from assay.pipelines.train_ray import train_distributed

    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    config = config_from_dict({"stage": "2", "data": [colours], "output": str(out), "init": str(missing)})
    with pytest.raises(TrainingError) as info:  # one worker: the same path as two, 5 s sooner
        train_distributed(config, num_workers=1)
    assert str(info.value) == f"init {missing}: no such model directory"
    assert final_checkpoint(out) is None


def test_root_cause_of_each_failure_kind():
    from ray.train import ControllerError, WorkerGroupError

    from assay.pipelines.train_ray import _root_cause

    same = TrainingError("init x: no such model directory")
    assert _root_cause(WorkerGroupError("snippet", {0: same, 1: same})) == str(same)
    mixed = WorkerGroupError("snippet", {1: ValueError("bad"), 0: same, 2: same})
    assert _root_cause(mixed) == f"worker 0, 2: {same}\nworker 1: ValueError: bad"
    assert _root_cause(ControllerError(RuntimeError("no resources"))) == "RuntimeError: no resources"


@pytest.mark.parametrize(
    "raw",
    [
        {"stage": "1", "tiny": TINY, "tokens_per_tile": 16},
        {"stage": "2", "init": "m", "lora": {"rank": 4, "target_modules": ["q_proj"]}, "subsets": ["a"]},
    ],
)
def test_config_reaches_the_workers_unchanged(raw):
    """Workers get ``config.to_dict()`` and rebuild it: same config, same resume fingerprint."""
    config = config_from_dict({**raw, "data": ["d"], "output": "o", "extra": {"note": [1]}})
    again = config_from_dict(config.to_dict())
    assert again == config and again.resume_key() == config.resume_key()
