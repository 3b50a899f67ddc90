"""`assay judge`: an assay reranker checkpoint judging a small dataset through the CLI, cached, and
the same judge spread over Ray actors giving the same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from helpers.colours import COLOURS, TINY, colour_dataset  # noqa: E402

from assay.curation.dataset import Dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

EXTRA = [
    {"query_id": "q-red-0", "doc_id": f"ans-{c}", "label": "hard_negative"} for c in COLOURS if c != "red"
]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Path:
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(["What colour is it?", *COLOURS], tokens_per_tile=16, seed=1, **settings)
    path = tmp_path_factory.mktemp("judge") / "reranker"
    MMEmbedder(model, processor).save_pretrained(path)
    return path


def _judged(path):
    ds = Dataset(path)
    rows = [r for n in ds.shards("pairs") for r in ds.read_shard("pairs", n).to_pylist()]
    return {(r["query_id"], r["doc_id"]): (r["label"], r["judge_p_yes"], r["judge_verdict"]) for r in rows}


def test_judge_command_writes_verdicts_and_reuses_its_cache(reranker, tmp_path):
    data = colour_dataset(tmp_path / "data", extra_pairs=EXTRA)
    cache = tmp_path / "cache.sqlite"
    args = ["judge", str(data), str(tmp_path / "out"), "--model", str(reranker), "--cache", str(cache)]
    result = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "judged 35 pairs" in result.output and "0 from the cache" in result.output
    assert "p_yes per subset" in result.output and "vqa" in result.output
    judged = _judged(tmp_path / "out")
    assert len(judged) == 35 and all(0.0 < p < 1.0 and v in ("yes", "no") for _, p, v in judged.values())
    # a second run into another folder is served from the cache, with the same numbers
    again = CliRunner().invoke(cli, [*args[:2], str(tmp_path / "out2"), *args[3:], "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "judged 0 pairs" in again.output and "35 from the cache" in again.output
    assert _judged(tmp_path / "out2") == judged


def test_judge_command_measures_its_verdicts_against_a_truth(reranker, tmp_path):
    from assay.curation.judge.quality import judge_quality
    from assay.curation.truth import read_truth, write_truth

    data = colour_dataset(tmp_path / "data", extra_pairs=EXTRA)
    gold = [k for k, (label, _, _) in _judged(data).items() if label == "positive"]
    truth = write_truth(tmp_path / "truth.parquet", [*gold, ("q-red-0", "ans-green")])  # 1 real FN
    args = ["judge", str(data), str(tmp_path / "out"), "--model", str(reranker), "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--cache", str(tmp_path / "c.sqlite"), "--truth", str(truth)])
    assert result.exit_code == 0, result.output
    assert f"judge quality against the truth {truth} (complete)" in result.output
    quality = Dataset(tmp_path / "out").manifest.extra["judge"]["quality"]
    # the numbers the command stored are those of the verdicts it wrote (no --keep: nothing trimmed)
    assert quality == judge_quality(tmp_path / "out", read_truth(truth))
    vqa = quality["per_subset"]["vqa"]
    assert vqa["candidates"] == 3 and vqa["relevant_candidates"] == 1 and vqa["positives"] == 16
    assert vqa["pairs"] == 19 and vqa["auc"] is not None
    # a truth file without the id columns is refused before anything is judged
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "q-red-0"}\n')
    result = CliRunner().invoke(cli, [*args[:2], str(tmp_path / "out2"), *args[3:], "--truth", str(bad)])
    assert result.exit_code != 0 and "no column query_id, doc_id" in result.output
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_judge_command_refuses_bad_settings(reranker, tmp_path):
    data = colour_dataset(tmp_path / "data")
    base = ["judge", str(data), str(tmp_path / "out"), "--cache", str(tmp_path / "c.sqlite")]
    r = CliRunner().invoke(cli, [*base, "--model", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "not a model directory" in r.output
    r = CliRunner().invoke(cli, [*base, "--model", str(reranker), "--rule", "unime:2"])
    assert r.exit_code != 0 and "beta must be in [0, 1]" in r.output
    r = CliRunner().invoke(cli, [*base, "--model", "m", "--backend", "openai"])
    assert r.exit_code != 0 and "--endpoint" in r.output


@pytest.mark.ray
def test_ray_actor_pool_gives_the_in_process_numbers(reranker, tmp_path):
    data = colour_dataset(tmp_path / "data", extra_pairs=EXTRA)
    common = ["--model", str(reranker), "--no-progress"]
    one = CliRunner().invoke(
        cli, ["judge", str(data), str(tmp_path / "a"), "--cache", str(tmp_path / "a.sqlite"), *common]
    )
    assert one.exit_code == 0, one.output
    pool = CliRunner().invoke(
        cli,
        [
            "judge",
            str(data),
            str(tmp_path / "b"),
            "--cache",
            str(tmp_path / "b.sqlite"),
            "--actors",
            "2",
            *common,
        ],
    )
    assert pool.exit_code == 0, pool.output
    a, b = _judged(tmp_path / "a"), _judged(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(abs(a[k][1] - b[k][1]) < 1e-5 for k in a)


def test_keep_caps_the_judged_hard_negatives_per_query(reranker, tmp_path):
    data = colour_dataset(tmp_path / "data", extra_pairs=EXTRA)
    base = [
        "judge",
        str(data),
        "--model",
        str(reranker),
        "--cache",
        str(tmp_path / "c.sqlite"),
        "--no-progress",
    ]
    runs = {}
    for name, extra in (("all", []), ("keep1", ["--keep", "1"])):
        args = [base[0], base[1], str(tmp_path / name), *base[2:], *extra, "--rule", "threshold:1.0"]
        result = CliRunner().invoke(cli, args)  # threshold 1.0: every pair is judged "no"
        assert result.exit_code == 0, result.output
        runs[name] = [k for k, (label, _, _) in _judged(tmp_path / name).items() if label == "hard_negative"]
    assert len(runs["all"]) == 3 and len(runs["keep1"]) == 1 and set(runs["keep1"]) < set(runs["all"])


def test_a_judge_that_gives_every_pair_the_same_p_yes_is_flagged(tmp_path):
    from assay.curation.dataset import write_dataset
    from assay.pipelines.commands.judge import constant_judge_warning

    def judged(name, p_yes):
        pairs = [
            {"query_id": "q", "doc_id": f"d{i}", "label": "hard_negative", "judge_p_yes": p}
            for i, p in enumerate(p_yes)
        ]
        write_dataset(
            tmp_path / name,
            {
                "queries": [{"query_id": "q", "subset": "s", "task": "retrieval", "text": "q"}],
                "corpus": [{"doc_id": f"d{i}", "subset": "s", "text": f"doc {i}"} for i in range(len(p_yes))],
                "pairs": pairs,
            },
        )
        return tmp_path / name

    warning = constant_judge_warning(judged("flat", [0.562, 0.5621, 0.5619, 0.562]))
    assert warning and "4 pairs nearly the same p_yes (0.562" in warning
    assert constant_judge_warning(judged("spread", [0.1, 0.9, 0.4, 0.7])) is None
