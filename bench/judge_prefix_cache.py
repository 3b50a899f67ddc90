"""vLLM judge throughput with prefix caching on and off, on judge prompts that share their instruction.

N (query, target) pairs are rendered with one judge prompt template (``--template``, default vqa), so
every prompt starts with the same chat-template system turn and instruction; with ``--candidates K``
the K prompts of a query also share the query (and its picture, with ``--images``), as when the mined
candidates of a query are judged. The same prompts are scored by a ``VLLMScorer`` with
``enable_prefix_caching=True`` and by one with ``False``, one engine after the other in this process;
each engine is warmed up first on unrelated prompts (kernel compilation, not the shared prefix), then
``score`` is timed on ``--repeats`` fresh prompt sets and the median pairs/s is reported. The model is
``--model`` or, by default, the tiny random Qwen2-VL of ``training.tiny_qwen2vl`` built in a
temporary directory (float32). Needs vLLM (``.venv-vllm``)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python bench/judge_prefix_cache.py --pairs 400
    ... --images --candidates 8 --block-size 32

vLLM caches whole KV blocks only, and its CPU block size is 128 tokens: a shared prefix shorter than
that (a judge instruction is ~50 tokens) is never reused unless ``--block-size`` is smaller.

Prints pairs/s of each setting and, last, ``prefix_cache_speedup=X`` (pairs/s with caching / without).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

from PIL import Image, ImageDraw  # noqa: E402

from assay.curation.judge.prompts import images_of, load_prompt, render  # noqa: E402
from assay.curation.judge.scoring import JudgeItem  # noqa: E402

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30)}
WORDS = [
    "the",
    "a",
    "small",
    "large",
    "bright",
    "dark",
    "shape",
    "circle",
    "square",
    "triangle",
    "on",
    "left",
    "right",
    "of",
    "image",
    "picture",
]


def _png(colour: str, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (56, 56), (250, 250, 250))
    x, y = rng.randrange(0, 28), rng.randrange(0, 28)
    ImageDraw.Draw(img).ellipse((x, y, x + 27, y + 27), fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_items(n: int, template: str, images: bool, candidates: int = 1, seed: int = 0) -> list[JudgeItem]:
    """n distinct judge prompts rendered from one template: ``candidates`` targets per query, in a row.

    Every prompt shares the template's system turn and instruction; the ``candidates`` prompts of one
    query (its image included) also share the query, as when the mined candidates of a query are judged.
    """
    rng = random.Random(seed)
    prompt, names = load_prompt(template), list(COLOURS)
    items: list[JudgeItem] = []
    for q in range(-(-n // candidates)):
        colour = names[q % len(names)]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        query = {"text": f"Question {seed}.{q}: what colour is {words}?", "image": None}
        if images:
            query["image"] = {"bytes": _png(colour, seed * 100_003 + q), "path": None}
        for _ in range(min(candidates, n - len(items))):
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            target = {"text": f"{rng.choice(names)} {answer}", "image": None}
            items.append(JudgeItem(render(prompt, query, target), images_of(query, target), prompt.labels))
    return items


def time_scoring(model: str, runs: list[list[JudgeItem]], prefix_caching: bool, engine: dict) -> float:
    """Median pairs/s of one engine's ``score`` over each item list of ``runs`` (after a warm-up)."""
    from assay.curation.judge.vllm_backend import VLLMScorer

    warmup = [JudgeItem([{"type": "text", "text": f"warm up {i}"}]) for i in range(8)]
    rates = []
    with VLLMScorer(model, enable_prefix_caching=prefix_caching, **engine) as scorer:
        scorer.score(warmup)  # compiles the kernels; shares no prefix with the timed prompts
        for items in runs:
            t0 = time.perf_counter()
            scores = scorer.score(items)
            rates.append(len(items) / (time.perf_counter() - t0))
            failed = [s.error for s in scores if not s.ok]
            if failed:
                raise SystemExit(f"{len(failed)} of {len(items)} pairs failed, e.g. {failed[0]}")
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a tiny random Qwen2-VL built here)")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--template", default="vqa", help="judge prompt family or YAML path")
    ap.add_argument("--images", action="store_true", help="give each query a 56 px picture")
    ap.add_argument("--candidates", type=int, default=1, help="targets judged per query (share its prefix)")
    ap.add_argument("--block-size", type=int, help="KV cache block size (vLLM's default: 128 on CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per setting, new prompts each")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-mib", type=int, default=512)
    args = ap.parse_args()

    runs = [
        make_items(args.pairs, args.template, args.images, args.candidates, seed=r)
        for r in range(args.repeats)
    ]
    engine = {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "kv_cache_memory_bytes": args.kv_cache_mib * 1024**2,
    }
    if args.block_size:
        engine["block_size"] = args.block_size
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from assay.training.tiny_qwen2vl import build_tiny_qwen2vl

            instruction = load_prompt(args.template).instruction
            model = str(build_tiny_qwen2vl(Path(tmp) / "tiny-qwen2vl", texts=[instruction, *WORDS]))
        on = time_scoring(model, runs, True, engine)
        off = time_scoring(model, runs, False, engine)
    kind = "image+text" if args.images else "text-only"
    print(
        f"{args.pairs} {kind} {args.template} prompts, {args.candidates} per query, block size "
        f"{args.block_size or 'default'}, model {args.model or 'tiny random Qwen2-VL'}"
    )
    print(f"prefix caching on:  {on:.1f} pairs/s (median of {args.repeats})")
    print(f"prefix caching off: {off:.1f} pairs/s (median of {args.repeats})")
    print(f"prefix_cache_speedup={on / off:.2f}")


if __name__ == "__main__":
    main()
