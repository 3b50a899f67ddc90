"""The trainer: configs, training units, the stages on a tiny model, checkpoints and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.colours import TINY, colour_dataset
from safetensors.torch import load_file

from assay.training.config import ConfigError, config_from_dict, load_config
from assay.training.data import TrainingData, epoch_batches, generative_sample
from assay.training.evaluate import evaluate
from assay.training.generative import Reranker
from assay.training.inputs import ProcessorInputs
from assay.training.losses import InfoNCELoss
from assay.training.model import load_embedder
from assay.training.steps import StageSteps
from assay.training.trainer import COMPLETE_FILE, LOG_FILE, TrainingError, final_checkpoint, train

QUIET = {"progress": False, "save_every": 100}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("colours") / "ds")


@pytest.fixture(scope="module")
def stage1(colours, tmp_path_factory):
    """A stage-1 checkpoint of the tiny model on the colours (shared by the later stages)."""
    out = tmp_path_factory.mktemp("stage1")
    config = config_from_dict(
        {
            "stage": "1",
            "data": [str(colours)],
            "output": str(out),
            "tiny": TINY,
            "tokens_per_tile": 16,
            "lr": 3e-3,
            "batch_size": 8,
            "mini_batch": 8,
            "epochs": 8,
            **QUIET,
        }
    )
    return train(config)


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / LOG_FILE).read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


# ---------------------------------------------------------------- configs


def test_config_defaults_follow_the_paper(tmp_path):
    c2 = config_from_dict({"stage": 2, "data": "d", "output": "o", "init": "m"})
    assert c2.stage == "2" and c2.lora.rank == 16 and c2.temperature == 0.03 and c2.lr == 2e-4
    c3 = config_from_dict({"stage": "3", "data": ["d"], "output": "o", "init": "m"})
    assert c3.negatives == "judged" and c3.num_negatives == 12
    c1 = config_from_dict({"stage": "1", "data": ["d"], "output": "o", "init": "m"})
    assert c1.lora is None and c1.lr == 1e-5


@pytest.mark.parametrize(
    "text, message",
    [
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nlearning_rate: 1\n", "unknown key(s) learning_rate"),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nlora: {rnak: 4}\n", "lora: unknown key(s) rnak"),
        ("stage: '4'\ndata: [d]\noutput: o\ninit: m\n", "stage must be one of"),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nbatch_size: many\n", "batch_size must be int"),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nepochs: true\n", "epochs must be float"),
        (
            "stage: '2'\ndata: [d]\noutput: o\ninit: m\nlora: {rank: '16'}\n",
            "lora.rank must be int, got '16'",
        ),
        (
            "stage: '2'\ndata: [d]\noutput: o\ntiny: {hidden_size: 8, depth: 2}\n",
            "tiny: unknown key(s) depth",
        ),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nnegatives: hard\n", "negatives must be one of"),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\nsubsets: [vqa, 3]\n", "subsets[1] must be str, got 3"),
        ("stage: '2'\ndata: [d]\noutput: o\n", "give init"),
        ("stage: '2'\ndata: [d]\noutput: o\ninit: m\ntrust_remote_code: true\n", "trust_remote_code"),
        ("!!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_config_reports_every_problem_at_once_and_takes_an_int_for_a_float(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: '2'\ndata: [d]\noutput: o\ninit: m\nlr: 0\nbatchsize: 8\nwarmup_ratio: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unknown key(s) batchsize (known: batch_size, ")
    assert "lr must be > 0, got 0" in message and "warmup_ratio must be < 1, got 1" in message
    assert "\n" not in message  # one line for the terminal
    # YAML reads `lr: 1` and `epochs: 3` as ints: a float field takes them (as floats)
    config = config_from_dict({"stage": "2", "data": ["d"], "output": "o", "init": "m", "lr": 1, "epochs": 3})
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.epochs, float)


# ---------------------------------------------------------------- units


def test_contrastive_units_take_judged_negatives_and_never_false_negatives(tmp_path):
    extra = [
        {
            "query_id": "q-red-0",
            "doc_id": "ans-blue",
            "label": "hard_negative",
            "rank": 3,
            "judge_verdict": "no",
        },
        {
            "query_id": "q-red-0",
            "doc_id": "ans-green",
            "label": "hard_negative",
            "rank": 1,
            "judge_verdict": "yes",
        },  # judged relevant: a false negative
        {"query_id": "q-red-0", "doc_id": "ans-yellow", "label": "hard_negative", "rank": 2},  # not judged
        {"query_id": "q-red-1", "doc_id": "ans-blue", "label": "false_negative"},
    ]
    data = TrainingData.load([str(colour_dataset(tmp_path / "ds", extra_pairs=extra))])
    q0, q1 = data.query_index["q-red-0"], data.query_index["q-red-1"]
    docs = data.doc_index
    by_query = {u.query: u for u in data.contrastive_units("judged", 12)}
    assert by_query[q0].negatives == (docs["ans-blue"],)
    mined = {u.query: u for u in data.contrastive_units("mined", 12)}
    assert mined[q0].negatives == (docs["ans-yellow"], docs["ans-blue"])  # rank order, green left out
    assert (
        mined[q0].negatives[:1]
        == data.contrastive_units("mined", 1)[
            [u.query for u in data.contrastive_units("mined", 1)].index(q0)
        ].negatives
    )
    assert docs["ans-green"] in data.excluded(q0) and docs["ans-blue"] in data.excluded(q1)
    assert all(not u.negatives for u in data.contrastive_units("none", 12))


def test_excluded_docs_are_masked_out_of_the_softmax():
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 1] = True
    loss = InfoNCELoss(temperature=0.05)
    logits, _ = loss.compute_logits(q, p, exclude=exclude)
    assert logits[0, 1] == float("-inf") and torch.isfinite(logits[1]).all()
    # the same loss as if column 1 did not exist for row 0
    by_hand = -torch.log_softmax(torch.stack([q[0] @ p[0], q[0] @ p[2]]) / 0.05, 0)[0]
    per_row = torch.nn.functional.cross_entropy(logits, torch.arange(3), reduction="none")
    assert torch.allclose(per_row[0], by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="own positive"):
        loss.compute_logits(q, p, exclude=torch.eye(3, dtype=torch.bool))


def test_generative_samples_read_the_image_side_as_input():
    img = {"bytes": b"x", "path": None}
    vqa = generative_sample(
        {"image": img, "text": "What colour?", "task": "vqa"}, {"text": "red", "image": None}
    )
    assert vqa == ({"image": img, "text": "What colour?"}, "red")
    caption = generative_sample({"image": None, "text": "a red image"}, {"text": None, "image": img})
    assert caption[1] == "a red image" and caption[0]["image"] is img
    assert generative_sample({"image": img, "text": None}, {"image": img, "text": None}) is None


def test_batches_are_a_function_of_seed_and_epoch():
    subsets = ["a"] * 10 + ["b"] * 7
    first = epoch_batches(subsets, 4, seed=1, epoch=0)
    assert first == epoch_batches(subsets, 4, seed=1, epoch=0)
    assert first != epoch_batches(subsets, 4, seed=1, epoch=1)
    assert all(len({subsets[i] for i in b}) == 1 for b in first)  # one subset per batch
    assert sorted(i for b in first for i in b) == list(range(17))
    capped = epoch_batches(subsets, 4, seed=1, epoch=0, max_units_per_subset=3)
    assert sum(len(b) for b in capped) == 6


# ---------------------------------------------------------------- stages


def test_stage1_learns_and_writes_a_complete_checkpoint(stage1):
    out = stage1.parent
    curve = losses(out)
    assert curve[-1] < 0.75 * curve[0]
    done = json.loads((out / COMPLETE_FILE).read_text())
    assert done["final"] == stage1.name and final_checkpoint(out) == stage1
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "training_config.json",
        "checkpoint.json",
    ):
        assert (stage1 / name).is_file(), name
    assert not list(stage1.rglob("*.bin")) and not list(stage1.rglob("*.pt"))


@pytest.mark.parametrize("lora", [None, {"rank": 8}], ids=["full", "lora"])
def test_stage2_warmup_learns_the_colours(colours, stage1, tmp_path, lora):
    config = config_from_dict(
        {
            "stage": "2",
            "data": [str(colours)],
            "output": str(tmp_path),
            "init": str(stage1),
            "lora": lora,
            "lr": 2e-3,
            "batch_size": 8,
            "mini_batch": 4,
            "epochs": 6,
            **QUIET,
        }
    )
    final = train(config)
    embedder = load_embedder(final)
    metrics = evaluate(colours, embedder.encode_queries, embedder.encode_candidates, subsets=["vqa"])
    assert metrics["per_subset"]["vqa"]["p_at_1"] >= 0.5  # chance is 0.25
    if lora:
        assert (final / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("1", {"tiny": TINY, "tokens_per_tile": 16, "lr": 3e-3}),
        ("2", {"lora": {"rank": 4}, "lr": 1e-3}),
        ("3", {"lora": None, "lr": 1e-3}),
    ],
)
def test_resume_mid_stage_ends_where_an_uninterrupted_run_ends(colours, stage1, tmp_path, stage, extra):
    """Stop after the step-2 checkpoint (what a kill leaves), rerun: the same final weights."""
    base = {
        "stage": stage,
        "data": [str(colours)],
        "batch_size": 8,
        "mini_batch": 4,
        "max_steps": 4,
        "progress": False,
        "save_every": 2,
        "keep_checkpoints": 5,
        **extra,
    }
    if stage != "1":
        base["init"] = str(stage1)
    whole = train(config_from_dict({**base, "output": str(tmp_path / "whole")}))
    cut = tmp_path / "cut"
    shutil.copytree(whole.parent, cut)
    shutil.rmtree(cut / "step-000004")
    (cut / COMPLETE_FILE).unlink()
    resumed = train(config_from_dict({**base, "output": str(cut)}))
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(cut) == losses(whole.parent)  # the log is rewritten from the resumed step


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("1", {"tiny": TINY, "tokens_per_tile": 16, "lr": 3e-3, "mini_batch": 4}),
        ("2", {"lora": None, "lr": 1e-3, "mini_batch": 8}),  # one mini-batch: a single pass
        ("2", {"lora": None, "lr": 1e-3, "mini_batch": 3}),  # GradCache over three mini-batches
        ("reranker", {"lora": None, "lr": 1e-3, "mini_batch": 8}),
    ],
    ids=["stage1", "stage2-one-pass", "stage2-gradcache", "reranker"],
)
def test_cached_inputs_train_exactly_as_the_processor_on_every_batch(colours, stage1, tmp_path, stage, extra):
    """The same losses and weights, bit for bit, whether a step's inputs come from the processor
    (input_cache: off), from a cache being filled, or from a cache filled by an earlier run."""
    base = {"stage": stage, "data": [str(colours)], "batch_size": 8, "max_steps": 3, **QUIET, **extra}
    if stage != "1":
        base["init"] = str(stage1)
    cache = tmp_path / "inputs"
    plain = train(config_from_dict({**base, "output": str(tmp_path / "plain"), "input_cache": "off"}))
    cold = train(config_from_dict({**base, "output": str(tmp_path / "cold"), "input_cache": str(cache)}))
    assert list(cache.glob("*/shard-*.safetensors"))
    warm = train(config_from_dict({**base, "output": str(tmp_path / "warm"), "input_cache": str(cache)}))
    for run in (cold, warm):
        a, b = weights(plain), weights(run)
        assert all(torch.equal(a[k], b[k]) for k in a), run
        assert losses(run.parent) == losses(plain.parent)


def test_one_pass_gives_gradcaches_gradients_bit_for_bit(colours, stage1, tmp_path):
    """A batch in one mini-batch skips GradCache's first pass: the same loss and gradients."""
    config = config_from_dict(
        {"stage": "3", "data": [str(colours)], "init": str(stage1), "output": str(tmp_path), "lora": None}
        | {"mini_batch": 16, "negatives": "mined", "num_negatives": 1}
    )
    extra = [{"query_id": f"q-red-{k}", "doc_id": "ans-blue", "label": "hard_negative"} for k in range(4)]
    data = TrainingData.load([str(colour_dataset(tmp_path / "ds", extra_pairs=extra))])
    embedder = load_embedder(stage1).train()
    stage = StageSteps(config, data, embedder, torch.device("cpu"), ProcessorInputs(embedder))
    prepared = stage.prepare(stage.units[:12])
    assert [len(g) for g in prepared.groups] == [1, 1, 1]  # queries, positives, negatives
    grads = []
    for gradcache in (False, True):
        embedder.zero_grad(set_to_none=True)
        loss = stage._contrastive(prepared, gradcache=gradcache)
        grads.append(
            (loss, {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None})
        )
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == loss_b and a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradcache_over_several_mini_batches_stays_close_to_one_pass(colours, stage1, tmp_path):
    base = {"stage": "2", "data": [str(colours)], "init": str(stage1), "lora": None, "lr": 1e-3}
    base |= {"batch_size": 8, "max_steps": 2, "num_negatives": 0, **QUIET}
    one = train(config_from_dict({**base, "output": str(tmp_path / "one"), "mini_batch": 8}))
    split = train(config_from_dict({**base, "output": str(tmp_path / "split"), "mini_batch": 2}))
    a, b = weights(one), weights(split)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6  # other paddings, other roundings
    assert losses(one.parent) == pytest.approx(losses(split.parent), rel=1e-6)


def test_the_input_cache_lives_beside_the_run_and_the_log_says_what_a_step_waited(colours, stage1, tmp_path):
    out = tmp_path / "run" / "stage2"
    config = {"stage": "2", "data": [str(colours)], "init": str(stage1), "output": str(out)}
    train(config_from_dict({**config, "batch_size": 8, "max_steps": 2, "lora": None, **QUIET}))
    (key_dir,) = (tmp_path / "run" / "cache" / "inputs").iterdir()
    assert (key_dir / "key.json").is_file() and list(key_dir.glob("shard-*.safetensors"))
    entry = json.loads((out / LOG_FILE).read_text().splitlines()[-1])
    assert 0 <= entry["input_wait_seconds"] <= entry["seconds"]


def test_resume_refuses_a_different_config(colours, stage1, tmp_path):
    base = {
        "stage": "2",
        "data": [str(colours)],
        "init": str(stage1),
        "output": str(tmp_path),
        "batch_size": 8,
        "max_steps": 2,
        "progress": False,
        "save_every": 1,
    }
    train(config_from_dict(base))
    (tmp_path / COMPLETE_FILE).unlink()
    with pytest.raises(TrainingError, match="different config"):
        train(config_from_dict({**base, "lr": 1e-3}))
    train(config_from_dict({**base, "save_every": 5}))  # a runtime setting may change


def test_stage3_runs_on_judged_negatives(colours, stage1, tmp_path):
    extra = [
        {
            "query_id": f"q-red-{k}",
            "doc_id": "ans-green",
            "label": "hard_negative",
            "rank": 1,
            "judge_verdict": "no",
        }
        for k in range(4)
    ]
    ds = colour_dataset(tmp_path / "judged", extra_pairs=extra)
    config = config_from_dict(
        {
            "stage": "3",
            "data": [str(ds)],
            "output": str(tmp_path / "s3"),
            "init": str(stage1),
            "batch_size": 8,
            "mini_batch": 4,
            "max_steps": 2,
            **QUIET,
        }
    )
    final = train(config)
    assert final.is_dir()
    assert all(torch.isfinite(torch.tensor(losses(final.parent))))


def test_reranker_trains_the_verdict_the_judge_reads(colours, stage1, tmp_path):
    """The reranker's training loss is -log of the p_yes its judge reads: the cross-entropy over the
    two label tokens at the answer position, nothing else of the vocabulary. Scoring reads p_yes from
    those two tokens, the same number as a full forward pass renormalised to them.

    (Whether it learns to compare an image with a label is tests/training/test_image_only.py.)
    """
    config = config_from_dict(
        {
            "stage": "reranker",
            "data": [str(colours)],
            "output": str(tmp_path),
            "init": str(stage1),
            "lr": 1e-2,
            "batch_size": 8,
            "mini_batch": 8,
            "epochs": 8,
            "subsets": ["vqa"],
            **QUIET,
        }
    )
    final = train(config)
    assert all(0.0 < x < 5.0 for x in losses(tmp_path))
    embedder = load_embedder(final)
    tok = embedder.processor.tokenizer
    assert len(tok("yes", add_special_tokens=False)["input_ids"]) == 1  # one token per label word
    data = TrainingData.load([str(colours)], ["vqa"])
    queries = data.queries[:4]
    docs = [data.corpus[data.doc_index["ans-red"]]] * 4
    p_yes = Reranker(embedder).score(queries, docs)
    assert len(p_yes) == 4 and all(0.0 < p < 1.0 for p in p_yes)
    from assay.curation.judge.scoring import label_token_ids
    from assay.training.generative import _encode_prompts, build_batch, label_loss, reranker_sample

    yes, no = label_token_ids(tok, ("yes", "no"))
    # the loss a step computes, on two "yes" and two "no" verdicts, is -log p(verdict) as scored
    matches = [True, False, True, False]
    samples = [reranker_sample(None, q, d, m) for q, d, m in zip(queries, docs, matches, strict=True)]
    batch = build_batch(embedder, samples, end_of_turn=False)
    batch["label_ids"] = torch.tensor([[yes, no]] * 4)
    with torch.no_grad():
        loss, rows = label_loss(embedder, batch)
    want = -sum(
        float(torch.log(torch.tensor(p if m else 1 - p))) for p, m in zip(p_yes, matches, strict=True)
    )
    assert rows == 4 and float(loss) == pytest.approx(want, rel=1e-4)
    # the same number as a forward pass over the whole vocabulary would give, renormalised to the labels
    batch = _encode_prompts(embedder, [reranker_sample(None, queries[0], docs[0], True)], "left")
    with torch.no_grad():
        logits = embedder.model(**batch).logits[0, -1]
    assert p_yes[0] == pytest.approx(float(torch.softmax(logits[[yes, no]], 0)[0]), abs=1e-5)


def test_freeze_vision_keeps_the_vision_tower_and_trains_the_rest(colours, stage1, tmp_path):
    """``freeze_vision``: the judge trains its comparison on top of the init's eyes; the vision
    tower's weights come out bit for bit the init's, the language model's do not."""
    config = config_from_dict(
        {
            "stage": "reranker",
            "data": [str(colours)],
            "output": str(tmp_path),
            "init": str(stage1),
            "freeze_vision": True,
            "lr": 1e-2,
            "batch_size": 8,
            "mini_batch": 8,
            "max_steps": 4,
            "subsets": ["vqa"],
            **QUIET,
        }
    )
    before = load_embedder(stage1).model.state_dict()
    after = load_embedder(train(config)).model.state_dict()
    vision = [k for k in before if ".vision_tower." in f".{k}"]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    language = [k for k in before if "language_model" in k and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in language)
