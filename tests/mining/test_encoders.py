"""Encoders for mining: batches cut by token length, the fast mode, --max-length, and the same
negatives as sentence-transformers' ``mine_hard_negatives`` on real text."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

from click.testing import CliRunner  # noqa: E402
from helpers.docstrings import docstring_pairs  # noqa: E402

from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.mining import openvino_text  # noqa: E402
from assay.mining.embed_cache import EmbeddingCache  # noqa: E402
from assay.mining.encoders import EncoderError, length_batches, load_encoder  # noqa: E402
from assay.mining.select_spec import parse_rules  # noqa: E402
from assay.mining.stage import default_depth, mine_dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402

#: OpenVINO imported through assay (never ``import openvino`` here: that alone sends telemetry).
needs_openvino = pytest.mark.skipif(not openvino_text.available(), reason="openvino is not installed")


def stdlib_pairs(n: int) -> list[tuple[str, str]]:
    """Real text pairs that do not depend on what else is installed: the standard library's."""
    return docstring_pairs(sysconfig.get_paths()["stdlib"], n, words=40, recursive=False)


@pytest.fixture(scope="module")
def pairs():
    return stdlib_pairs(300)


@pytest.fixture(scope="module")
def exact():
    return load_encoder("all-MiniLM-L6-v2", batch_size=16)


def test_batches_are_cut_by_tokens_longest_first():
    lengths = [5, 300, 40, 40, 7, 120, 3, 40]
    batches = length_batches(lengths, 128)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every row once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert [len(b) for b in batches] == [1, 1, 3, 3]  # 300 | 120 | 40 40 40 | 7 5 3
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128 for b in batches)
    assert len(batches[0]) == 1  # a row longer than the budget still gets a batch of its own


def test_encoding_by_token_length_gives_sentence_transformers_vectors(exact, pairs):
    """Cutting batches by token count changes which rows share a batch, not the vectors (beyond
    float rounding), and every vector comes back in its row's place."""
    texts = [d for _, d in pairs[:60]] + [q for q, _ in pairs[:60]]
    ours = exact.encode([{"text": t} for t in texts], "candidate")
    theirs = exact.model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-5
    assert (np.argmax(ours @ theirs.T, axis=1) == np.arange(len(texts))).all()


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_the_fast_mode_is_close_and_cached_apart_from_exact(exact, pairs, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("ASSAY_FAST_KIND", kind)
    if kind == "int8":  # a user is told what int8 costs
        with pytest.warns(UserWarning, match="int8 dynamic quantisation"):
            fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    else:
        fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    assert fast.model_id == f"{exact.model_id}#{kind}"
    rows = [{"text": d} for _, d in pairs[:40]]
    with EmbeddingCache(tmp_path / "cache", exact) as cache:
        e = cache.embed(rows, "candidate")
    with EmbeddingCache(tmp_path / "cache", fast) as cache:
        f = cache.embed(rows, "candidate")
        assert cache.encoded == len(rows)  # nothing taken from the exact vectors
    cos = (e * f).sum(axis=1)
    assert cos.min() > (0.9 if kind == "int8" else 0.999) and not np.array_equal(e, f)
    with pytest.raises(EncoderError, match="precision"):
        load_encoder("all-MiniLM-L6-v2", precision="half")


@needs_openvino
def test_openvino_gives_torch_vectors_and_is_cached_apart(exact, pairs, tmp_path, monkeypatch):
    """--fast for a sentence-transformers text model, with openvino installed, is float32 on
    OpenVINO: the exact vectors to float rounding (padded batches, unpadded ones, a cut length),
    under their own cache key, and converted only when something is encoded."""
    monkeypatch.delenv("ASSAY_FAST_KIND", raising=False)
    fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    assert fast.model_id == f"{exact.model_id}#openvino"
    assert fast._openvino._request is None  # nothing converted yet
    rows = [{"text": d} for _, d in pairs[:40]] + [{"text": q} for q, _ in pairs[:40]]
    rows += [{"text": "one two three"}, {"text": "four five six"}, {"text": ""}]  # equal lengths; empty
    with EmbeddingCache(tmp_path / "cache", exact) as cache:
        e = cache.embed(rows, "candidate")
    with EmbeddingCache(tmp_path / "cache", fast) as cache:
        f = cache.embed(rows, "candidate")
        assert cache.encoded == len(rows)  # nothing taken from the exact vectors
    assert np.abs(e - f).max() < 1e-5
    one = fast.encode([{"text": pairs[0][1]}], "candidate")  # a batch of one row, no padding
    assert np.abs(one[0] - e[0]).max() < 1e-5
    short_exact = load_encoder("all-MiniLM-L6-v2", batch_size=16, max_length=12)
    short_fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, max_length=12, precision="fast")
    a, b = short_exact.encode(rows[:20], "candidate"), short_fast.encode(rows[:20], "candidate")
    assert np.abs(a - b).max() < 1e-5 and np.abs(a - e[:20]).max() > 1e-2  # the cut is OpenVINO's too


@needs_openvino
def test_openvino_sends_and_writes_no_telemetry(tmp_path):
    """``import openvino`` alone reports usage unless a user opted out (a client id under ~/intel,
    an "import" event to Google Analytics). A fresh process that mines with --fast on OpenVINO
    imports, converts and encodes without writing any of it, its converter bound to the no-op stub."""
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys\n"
        "from assay.mining.encoders import load_encoder\n"
        "e = load_encoder('all-MiniLM-L6-v2', precision='fast')\n"
        "assert e.model_id.endswith('#openvino'), e.model_id\n"
        "assert e.encode([{'text': 'a row to convert the model on'}], 'query').shape == (1, 384)\n"
        "print(sys.modules['openvino.tools.ovc.convert_impl'].tm.__name__)\n"
    )
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "ASSAY_FAST_KIND": "openvino"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("telemetry_stub")
    assert not (home / "intel").exists()


@needs_openvino
def test_openvino_imported_before_assay_converts_without_telemetry(monkeypatch):
    """Where openvino was imported before assay (its telemetry bound), converting for --fast swaps
    the converter's telemetry for the no-op stub."""
    import importlib

    calls = []

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return lambda *a, **k: self

    for name in ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils"):
        monkeypatch.setattr(importlib.import_module(name), "tm", Recording())
    monkeypatch.setenv("ASSAY_FAST_KIND", "openvino")
    fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    assert fast.encode([{"text": "a row to convert the model on"}], "query").shape == (1, 384)
    assert fast._openvino._request is not None  # it did convert
    assert calls == []


def _tiny_checkpoint(path, text: str) -> None:
    """A tiny assay checkpoint at ``path``, its vocabulary built from ``text``."""
    from helpers.colours import TINY

    from assay.training.model import MMEmbedder
    from assay.training.tiny import build_tiny

    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny([text], tokens_per_tile=16, **settings)
    MMEmbedder(model, processor).save_pretrained(path)


def test_the_fast_kind_is_chosen_by_model_and_what_is_installed(tmp_path, monkeypatch):
    """OpenVINO only where it runs the model (a sentence-transformers text model on the CPU, the
    package installed); elsewhere --fast is bf16 or int8, and forcing OpenVINO says why not."""
    from assay.mining.encoders import fast_kind

    monkeypatch.delenv("ASSAY_FAST_KIND", raising=False)
    monkeypatch.setattr(openvino_text, "available", lambda: False)
    assert fast_kind("cpu", openvino_model=True) in ("bf16", "int8")
    monkeypatch.setenv("ASSAY_FAST_KIND", "openvino")
    with pytest.raises(EncoderError, match="openvino is not installed"):
        fast_kind("cpu", openvino_model=True)
    monkeypatch.setattr(openvino_text, "available", lambda: True)
    assert fast_kind("cpu", openvino_model=True) == "openvino"
    with pytest.raises(EncoderError, match="this model or device is not one"):
        fast_kind("cuda", openvino_model=False)
    monkeypatch.setenv("ASSAY_FAST_KIND", "fp8")
    with pytest.raises(EncoderError, match="openvino, bf16, int8"):
        fast_kind("cpu")
    monkeypatch.delenv("ASSAY_FAST_KIND")
    assert fast_kind("cuda", openvino_model=False) == "bf16"

    _tiny_checkpoint(tmp_path / "ckpt", "a red square")
    monkeypatch.setenv("ASSAY_FAST_KIND", "bf16")  # an assay checkpoint: torch's fast kinds
    assert load_encoder(str(tmp_path / "ckpt"), precision="fast").model_id.endswith("#bf16")
    monkeypatch.setenv("ASSAY_FAST_KIND", "openvino")
    with pytest.raises(EncoderError, match="ASSAY_FAST_KIND=openvino"):
        load_encoder(str(tmp_path / "ckpt"), precision="fast")


def test_max_length_cuts_the_text_and_keys_the_cache(exact, tmp_path):
    short = load_encoder("all-MiniLM-L6-v2", batch_size=16, max_length=12)
    assert short.template_id != exact.template_id
    head = "parse the configuration file and return a mapping of sections"
    a, b = f"{head} and then write it back", f"{head}; afterwards nothing else happens at all"
    rows = [{"text": a}, {"text": b}]
    cut = short.encode(rows, "candidate")
    whole = exact.encode(rows, "candidate")
    assert np.abs(cut[0] - cut[1]).max() < 1e-6  # the same first 10 tokens (+ [CLS] and [SEP])
    assert np.abs(whole[0] - whole[1]).max() > 1e-2
    with EmbeddingCache(tmp_path / "cache", exact) as cache:
        cache.embed(rows, "candidate")
    with EmbeddingCache(tmp_path / "cache", short) as cache:
        cache.embed(rows, "candidate")
        assert cache.encoded == 2
    with pytest.raises(EncoderError, match="max_length"):
        load_encoder("all-MiniLM-L6-v2", max_length=0)


def test_max_length_on_an_assay_checkpoint_cuts_its_text(tmp_path):
    words = ["a", "red", "image", "of", "a", "small", "blue", "square", "next", "to", "a", "green", "circle"]
    _tiny_checkpoint(tmp_path / "ckpt", " ".join(words))
    whole = load_encoder(str(tmp_path / "ckpt"))
    cut = load_encoder(str(tmp_path / "ckpt"), max_length=4)
    tokenizer = cut.embedder.processor.tokenizer
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    head = tokenizer.decode(ids[:4])
    rows = [{"text": " ".join(words)}, {"text": " ".join(words[:6]) + " yellow"}, {"text": head}]
    v = cut.encode(rows, "query")
    assert np.abs(v[0] - v[2]).max() < 1e-5  # cut after its 4th token: the same as those 4 tokens
    w = whole.encode(rows, "query")
    assert np.abs(w[0] - w[2]).max() > 1e-3
    assert cut.template_id != whole.template_id


def test_the_default_depth_is_sentence_transformers_one():
    rules = parse_rules("margin:0.05,top:3")
    # range_max = 10 x 3 + 1 positive; plus the positive and the query itself (ST 6.x)
    assert default_depth(rules, 1) == 33
    assert default_depth(parse_rules("top:3"), 2) == 3 + 2 * 2 + 1


def _mine_both(pairs, encoder, tmp_path):
    from datasets import Dataset as HFDataset
    from sentence_transformers.util import mine_hard_negatives

    out = mine_hard_negatives(
        HFDataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]}),
        encoder.model,
        absolute_margin=0.05,
        num_negatives=3,
        sampling_strategy="top",
        output_format="labeled-list",
        batch_size=16,
        verbose=False,
    )
    st = {
        row["anchor"]: {t for t, label in zip(row["positive"], row["labels"], strict=True) if not label}
        for row in out
    }
    ds_path = tmp_path / "pairs"
    if not ds_path.exists():
        write_dataset(
            ds_path,
            {
                "queries": [{"query_id": f"q{i}", "subset": "s", "text": q} for i, (q, _) in enumerate(pairs)],
                "corpus": [{"doc_id": f"d{i}", "subset": "s", "text": d} for i, (_, d) in enumerate(pairs)],
                "pairs": [{"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"} for i in range(len(pairs))],
            },
            rows_per_shard=100,
        )  # fmt: skip
    out_path = tmp_path / f"out-{encoder.model_id.rsplit('#', 1)[-1]}"
    mine_dataset(ds_path, out_path, encoder, cache_dir=tmp_path / "cache", rules="margin:0.05,top:3")
    ds = Dataset(out_path)
    ours: dict[str, set[str]] = {}
    for name in ds.shards("pairs"):
        for p in ds.read_shard("pairs", name).to_pylist():
            if p["label"] == "hard_negative":
                ours.setdefault(pairs[int(p["query_id"][1:])][0], set()).add(pairs[int(p["doc_id"][1:])][1])
    return st, ours


def _same(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    return sum(a.get(k, set()) == b.get(k, set()) for k in keys) / len(keys)


def test_exact_mining_finds_sentence_transformers_negatives(exact, pairs, tmp_path):
    """The issue's target, on 300 real pairs: at least 99% of queries get the very negatives
    ``mine_hard_negatives`` gives them (same model, margin 0.05, top 3; the one-query-in-a-hundred
    allowance is for near ties that two scoring kernels may order differently)."""
    st, ours = _mine_both(pairs, exact, tmp_path)
    assert len(st) > 100
    assert _same(st, ours) >= 0.99


def test_fast_mining_keeps_most_exact_negatives(pairs, tmp_path, monkeypatch):
    """bfloat16 (what --fast is where the CPU or GPU has it; forced here so that every machine
    tests the same thing) moves scores by ~1e-3: most queries keep their exact three negatives."""
    monkeypatch.setenv("ASSAY_FAST_KIND", "bf16")
    fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    st, ours = _mine_both(pairs, fast, tmp_path)
    assert 0.8 <= _same(st, ours) < 1.0


@needs_openvino
def test_openvino_mining_finds_sentence_transformers_negatives(pairs, tmp_path, monkeypatch):
    """--fast on OpenVINO is float32: the exact mode's target (>= 99% of queries with ST's very
    negatives) holds for it too, where bf16 stays under 100%."""
    monkeypatch.setenv("ASSAY_FAST_KIND", "openvino")
    fast = load_encoder("all-MiniLM-L6-v2", batch_size=16, precision="fast")
    st, ours = _mine_both(pairs, fast, tmp_path)
    assert len(st) > 100
    assert _same(st, ours) >= 0.99


def test_the_mine_command_takes_fast_and_max_length(tmp_path, pairs):
    ds = tmp_path / "ds"
    write_dataset(
        ds,
        {
            "queries": [{"query_id": f"q{i}", "subset": "s", "text": q} for i, (q, _) in enumerate(pairs[:30])],
            "corpus": [{"doc_id": f"d{i}", "subset": "s", "text": d} for i, (_, d) in enumerate(pairs[:30])],
            "pairs": [{"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"} for i in range(30)],
        },
    )  # fmt: skip
    args = ["mine", str(ds), str(tmp_path / "out"), "--encoder", "all-MiniLM-L6-v2", "--rules", "top:2"]
    args += ["--fast", "--max-length", "32", "--cache", str(tmp_path / "cache"), "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = Dataset(tmp_path / "out").manifest
    assert "#" in manifest.config["encoder"]  # the fast mode names itself in the provenance
    assert manifest.config["template"].endswith("|max32")
    assert manifest.counts["pairs"] == 30 + 30 * 2
    bad = CliRunner().invoke(cli, [*args[:4], "all-MiniLM-L6-v2", "--max-length", "0"])
    assert bad.exit_code != 0 and "max-length" in bad.output
