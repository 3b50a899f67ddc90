"""Remake the bad-input corpus in this folder (README.md lists every kind and what must happen).

    .venv/bin/python tests/data/bad_inputs/make.py

Writes, deterministically (a rerun changes nothing), small files only: the big inputs (a 200 MB text
field) and the things git cannot hold portably (symlinks) are made by the test at run time.

    ingest/    inputs of `assay ingest` (JSONL, CSV, Parquet, mapping YAML, image folder)
    datasets/  assay datasets (or folders posing as one) for `assay validate`
    config/    training configs for `assay train`
    loop/      loop files for `assay loop`
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: curation.schema
sys.path.insert(0, str(HERE.parents[1]))  # tests/: helpers.badrows

from helpers.badrows import huge_png_header, truncated_png  # noqa: E402

from assay.curation.schema import CORPUS_SCHEMA as CORPUS  # noqa: E402
from assay.curation.schema import PAIRS_SCHEMA as PAIRS  # noqa: E402
from assay.curation.schema import QUERIES_SCHEMA as QUERIES  # noqa: E402

# ------------------------------------------------------------------------------------------- images


def png(color=(10, 120, 200), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ helpers


def write(rel: str, data: bytes | str) -> Path:
    path = HERE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def query(qid, text=None, image_path=None):
    image = {"bytes": None, "path": image_path} if image_path else None
    return {"query_id": qid, "subset": "s", "task": "vqa", "instruction": None, "text": text, "image": image}


def doc(did, text):
    return {"doc_id": did, "subset": "s", "instruction": None, "text": text, "image": None}


def pair(qid, did, label="positive"):
    return {"query_id": qid, "doc_id": did, "label": label, "score": 1.0, "origin": "bad-inputs"}


def dataset(
    name: str, queries: list[dict], corpus: list[dict], pairs: list[dict], raw: dict | None = None
) -> Path:
    """A finished assay dataset (manifest written by hand: no absolute paths, no clock). ``raw``
    replaces a table's shard with the given Arrow table (wrong types)."""
    root = HERE / "datasets" / name
    tables = {"queries": (queries, QUERIES), "corpus": (corpus, CORPUS), "pairs": (pairs, PAIRS)}
    for table, (rows, schema) in tables.items():
        t = (raw or {}).get(table) or pa.Table.from_pylist(rows, schema=schema)
        write(f"datasets/{name}/{table}/part-00000.parquet", parquet_bytes(t))
    manifest = {
        "schema_version": 1,
        "stage": "bad-inputs",
        "config": {"made_by": "tests/data/bad_inputs/make.py"},
        "counts": {t: len(rows) for t, (rows, _) in tables.items()} | {"quarantine": 0},
        "data_root": None,
    }
    write(f"datasets/{name}/manifest.json", json.dumps(manifest, indent=1) + "\n")
    return root


def good_dataset(name: str, *bad_queries: dict, extra_pairs: tuple = (), extra_corpus: tuple = ()) -> Path:
    """One good query (q-good -> d-good) plus the bad rows, each bad query paired with d-good."""
    queries = [query("q-good", "a good question"), *bad_queries]
    corpus = [doc("d-good", "a good answer"), *extra_corpus]
    pairs = [pair(q["query_id"], "d-good") for q in queries] + list(extra_pairs)
    return dataset(name, queries, corpus, pairs)


# ------------------------------------------------------------------------------------------- ingest


def make_ingest() -> None:
    good = {"query_text": "what colour is it?", "doc_text": "blue"}
    # a Parquet file cut in half (no footer)
    full = parquet_bytes(pa.Table.from_pylist([good] * 50))
    write("ingest/truncated.parquet", full[: len(full) // 2])
    # text as int64, image as a string that is no path: rows 0 and 2 are wrong_type, row 1 is good
    write(
        "ingest/wrong_types.parquet",
        parquet_bytes(
            pa.table(
                {
                    "query_text": pa.array([12, None, 7], pa.int64()),
                    "query_image": pa.array([None, png(), None], pa.binary()),
                    "doc_text": pa.array(["a", "b", "c"], pa.string()),
                    "score": pa.array(["high", "1.0", "0.5"], pa.string()),
                }
            )
        ),
    )
    # latin-1 bytes in a UTF-8 file: line 2 / row 3 (line 3 of the CSV, after the header)
    write(
        "ingest/latin1.jsonl",
        jsonl([good]).encode()
        + b'{"query_text": "caf\xe9", "doc_text": "x"}\n'
        + jsonl([good | {"doc_text": "y"}]).encode(),
    )
    write("ingest/latin1_header.csv", b"caf\xe9,doc_text\ngood,doc\n")
    write("ingest/latin1.csv", b"query_text,doc_text\ngood,doc\ncaf\xe9 au lait,doc\nalso good,doc2\n")
    # UTF-16 files with a byte-order mark
    write("ingest/utf16.jsonl", jsonl([good, good | {"doc_text": "y"}]).encode("utf-16"))
    write("ingest/utf16.csv", "query_text,doc_text\ngood,doc\n".encode("utf-16"))
    # JSONL with line 3 broken (a missing quote and brace)
    lines = (
        jsonl([good, good | {"doc_text": "two"}])
        + '{"query_text": "broken, "doc_text": "x"\n'
        + jsonl([good | {"doc_text": "four"}])
    )
    write("ingest/malformed_line.jsonl", lines)
    # CSV rows with too few / too many fields (lines 3 and 4)
    write("ingest/ragged.csv", "query_text,doc_text,score\ngood,doc,0.5\nshort\ntoo,many,1,2\nfine,doc2,1\n")
    # empty files
    write("ingest/empty.jsonl", b"")
    write("ingest/empty.csv", b"")
    # a raw NUL byte inside a JSON string (line 2): JSON forbids control characters in strings
    write(
        "ingest/raw_nul.jsonl", jsonl([good]).encode() + b'{"query_text": "nul\x00here", "doc_text": "x"}\n'
    )
    # JSON lines that are not objects (line 2 an array, line 3 a string)
    write("ingest/not_objects.jsonl", jsonl([good]) + "[1, 2]\n" + '"just a string"\n')
    # line 2 nests arrays 5,000 deep (Python's JSON parser recurses once per level)
    write("ingest/deep_nesting.jsonl", jsonl([good]) + '{"query_text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    # an image path escaping the data root with ../ (line 2), for --embed-images
    write("ingest/escape/ok.png", png())
    write(
        "ingest/escape/pairs.jsonl",
        jsonl(
            [
                {"query_text": "fine", "doc_image": "ok.png"},
                {"query_text": "escape", "doc_image": "../../secret.png"},
            ]
        ),
    )
    # a mapping naming a target assay does not have
    write("ingest/unknown_target.yaml", "query_text: question\nanswer_text: answer\n")
    write("ingest/question_answer.jsonl", jsonl([{"question": "why?", "answer": "because"}]))
    # rows naming their own ids (--map query_id=id): g5 on line 2, and again on line 4 with other
    # content and another image; line 5 repeats line 3 exactly (stored once, not refused)
    clash = [
        {"id": "g1", "question": "a blue circle", "image": "images/good1.png"},
        {"id": "g5", "question": "a orange square number 5", "image": "images/good5.png"},
        {"id": "g2", "question": "a green triangle", "image": "images/good2.png"},
        {"id": "g5", "question": "a red square", "image": "images/good0.png"},
        {"id": "g2", "question": "a green triangle", "image": "images/good2.png"},
    ]
    write("ingest/id_clash.jsonl", jsonl(clash))
    # an image folder whose captions CSV has no caption column
    write("ingest/images/a.png", png())
    write("ingest/captions_no_column.csv", "file,text\na.png,a blue square\n")


# ----------------------------------------------------------------------------------------- datasets


def make_datasets() -> None:
    # a folder that is no dataset
    write("datasets/not_a_dataset/notes.txt", "just some notes, no manifest.json\n")
    write("datasets/not_a_dataset/pairs.csv", "query_text,doc_text\na,b\n")
    # a dataset whose manifest is cut off / claims a future schema version
    good_dataset("corrupt_manifest")
    write(
        "datasets/corrupt_manifest/manifest.json", '{"schema_version": 1, "stage": "ingest", "counts": {"qu'
    )
    good_dataset("future_schema")
    manifest = json.loads((HERE / "datasets/future_schema/manifest.json").read_text())
    write(
        "datasets/future_schema/manifest.json", json.dumps(manifest | {"schema_version": 99}, indent=1) + "\n"
    )
    # a dataset whose queries shard is a truncated Parquet file
    good_dataset("truncated_shard")
    shard = HERE / "datasets/truncated_shard/queries/part-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    # queries with text as int64 and image as a string
    dataset(
        "wrong_types",
        [],
        [doc("d-good", "a good answer")],
        [pair("q-1", "d-good")],
        raw={
            "queries": pa.table(
                {
                    "query_id": ["q-1", "q-2"],
                    "subset": ["s", "s"],
                    "task": ["vqa", "vqa"],
                    "text": pa.array([1, 2], pa.int64()),
                    "image": ["img/cat.png", "img/dog.png"],
                }
            )
        },
    )
    # q-dup twice with the same content (the repeat is refused, both pairs stay: they state the same);
    # q-clash twice with different content, each row with its own pair: which row a pair meant
    # cannot be told, so both rows and both pairs are refused (issue 15)
    dataset(
        "duplicate_ids",
        [
            query("q-good", "a good question"),
            query("q-dup", "the same question"),
            query("q-clash", "a orange square number 5"),
            query("q-dup", "the same question"),
            query("q-clash", "a red square"),
        ],
        [doc("d-good", "a good answer"), doc("d-other", "another answer")],
        [
            pair("q-good", "d-good"),
            pair("q-dup", "d-good"),
            pair("q-clash", "d-good"),
            pair("q-dup", "d-good"),
            pair("q-clash", "d-other"),
        ],
    )
    # pairs naming a query and a document that do not exist
    good_dataset("dangling_pairs", extra_pairs=(pair("q-missing", "d-good"), pair("q-good", "d-missing")))
    # a NUL character in a text
    good_dataset("nul_text", query("q-nul", "before\x00after"))
    # a pair label that is not positive/negative/hard_negative/false_negative
    dataset(
        "unknown_label",
        [query("q-good", "a good question")],
        [doc("d-good", "a good answer"), doc("d-other", "another answer")],
        [pair("q-good", "d-good"), pair("q-good", "d-other", label="Hard-Negative")],
    )
    # images by path under the dataset folder (the data root)
    for name, data in (
        ("image_text_file", b"this is a text file, not a picture\n"),
        ("image_huge_header", huge_png_header()),
        ("image_truncated", truncated_png(48)),
        ("image_zero_bytes", b""),
    ):
        good_dataset(name, query("q-bad", "look at this", image_path="img/bad.png"))
        write(f"datasets/{name}/img/bad.png", data)
    # img/link.png is made by the test: a symlink to a file outside the folder
    good_dataset("image_symlink_out", query("q-bad", "look at this", image_path="img/link.png"))
    good_dataset("image_absolute_path", query("q-bad", "look at this", image_path="/etc/hostname"))
    good_dataset("image_dotdot_path", query("q-bad", "look at this", image_path="../../secret.png"))
    good_dataset("image_nul_path", query("q-bad", "look at this", image_path="img/bad\x00.png"))


# ---------------------------------------------------------------------------------- configs, loops

TRAIN = 'stage: "1"\ndata: [runs/bad/data]\noutput: runs/bad/stage1\ntiny: {}\n'


def make_configs() -> None:
    write("config/unknown_keys.yaml", TRAIN + "learning_rate: 1.0e-4\nbatchsize: 8\n")
    write("config/python_tag.yaml", TRAIN + "lr: !!python/object/apply:os.system ['echo pwned']\n")
    write("config/lr_string.yaml", TRAIN + 'lr: "fast"\n')
    write("config/batch_size_zero.yaml", TRAIN + "batch_size: 0\n")
    write("config/not_yaml.yaml", TRAIN + "lora: {rank: 16\n")
    write("config/top_level_list.yaml", "- stage: 1\n- data: x\n")
    loop = "name: bad\nrun_dir: runs/bad-loop\nexecutor: local\nsteps:\n"
    write(
        "loop/python_tag.yaml",
        loop + "  - {name: raw, run: ingest, args: [x.jsonl, '{run}/raw']}\n"
        "  - !!python/object/apply:os.system ['echo pwned']\n",
    )
    write(
        "loop/unknown_step_ref.yaml",
        loop + "  - {name: raw, run: ingest, args: [x.jsonl, '{run}/raw']}\n"
        "  - {name: valid, run: validate, args: ['{rwa}', '{run}/valid']}\n",
    )
    write(
        "loop/two_steps.yaml",
        loop + "  - {name: raw, run: ingest, args: [x.jsonl, '{run}/raw']}\n"
        "  - {name: valid, run: validate, args: ['{raw}', '{run}/valid']}\n",
    )
    write("loop/unknown_command.yaml", loop + "  - {name: raw, run: ingestt, args: [x.jsonl, '{run}/raw']}\n")


def main() -> None:
    for sub in ("ingest", "datasets", "config", "loop"):
        if (HERE / sub).exists():
            shutil.rmtree(HERE / sub)
    make_ingest()
    make_datasets()
    make_configs()
    files = [p for p in HERE.rglob("*") if p.is_file()]
    print(f"{len(files)} files, {sum(p.stat().st_size for p in files)} bytes")


if __name__ == "__main__":
    main()
