"""Judge throughput: assay's transformers backend against the naive way, same model, same pairs, one run.

The naive baseline is what a first script does: one pair at a time, the processor, then
``model.generate(max_new_tokens=1, output_scores=True)`` and a softmax over the two label tokens'
scores. assay's backend (``curation.judge.hf.TransformersScorer``) renders the same prompts with the
same chat template and processor, groups them by length into batches, and runs ONE forward pass per
batch that keeps only the last position's logits (``logits_to_keep=1``), reading the two label
entries; prompts that share their query (instruction and query image) have that prefix encoded once
(``prefix_sharing``, the default; the bench also times the backend with it off). All are timed end
to end (processor included) on the same pairs (the naive loop once, as it runs for tens of seconds;
each backend setting ``--repeats`` times with a fresh scorer, the median counting, as one run of a
few seconds is at the mercy of anything else on the machine); the bench also checks that they give the same p_yes
(max difference printed), so the speed is not bought with wrong numbers.

The model is the quickstart's tiny compressed InternVL (hidden 64, two layers, 64 px images in 4 px
patches, 16 tokens per image), built from a config with random weights: throughput does not depend
on what the weights learned. Pairs are what the judge is given after mining: easy-vqa test questions
(image + question), each with ``--per-query`` candidate answers (its gold answer and other answers
in random order), rendered with judge_prompts/vqa.yaml. ``--per-query 1`` gives unrelated pairs (one
candidate per question), where only questions about the same image share anything.

    python bench/judge_throughput.py                         # 2000 pairs (250 queries x 8), batch 128, CPU
    python bench/judge_throughput.py --per-query 1           # 2000 unrelated pairs
    python bench/judge_throughput.py --device cuda           # on a GPU (fp32, the same model)
    python bench/judge_throughput.py --pairs 200             # quicker

Last line: ``speedup_vs_naive_generate=X`` (backend pairs/s divided by naive pairs/s).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pairs(n: int, per_query: int, seed: int = 0):
    """``n`` (query, candidate) pairs: n / per_query questions, each with per_query answers."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    labels = sorted(set(easy_vqa.get_answers()))
    per_query = min(per_query, len(labels))  # a question has at most every answer as a candidate
    rng = random.Random(seed)
    out = []
    for i in rng.sample(range(len(questions)), -(-n // per_query)):
        query = {"text": questions[i], "image": {"bytes": None, "path": paths[image_ids[i]]}}
        if per_query == 1:
            candidates = [answers[i] if rng.random() < 0.5 else rng.choice(labels)]
        else:
            others = rng.sample([a for a in labels if a != answers[i]], min(per_query - 1, len(labels) - 1))
            candidates = [answers[i], *others]
            rng.shuffle(candidates)
        out.extend((query, {"text": c}) for c in candidates)
    return out[:n], labels, per_query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--per-query", type=int, default=8, help="candidates per query (1: unrelated pairs)")
    ap.add_argument(
        "--batch", type=int, default=128, help="pairs per forward pass (the quickstart judges at 128)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="times each backend setting is timed (a fresh scorer each time); the median counts",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from assay.curation.judge.hf import TransformersScorer, prompt_text
    from assay.curation.judge.prompts import images_of, load_prompt, render
    from assay.curation.judge.scoring import JudgeItem, label_token_ids
    from assay.curation.schema import load_image
    from assay.training.tiny import build_tiny

    pairs, labels, per_query = _pairs(args.pairs, args.per_query)
    texts = [q["text"] for q, _ in pairs] + labels
    model, processor = build_tiny(texts, tokens_per_tile=16, patch_size=4, hidden_size=64, num_layers=2)
    model.to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    template = load_prompt("vqa")
    items = [JudgeItem(render(template, q, d), images_of(q, d), template.labels) for q, d in pairs]
    yes, no = label_token_ids(processor.tokenizer, template.labels)
    print(
        f"{len(items)} vqa judge prompts (image + question + answer; {per_query} per query), "
        f"tiny compressed InternVL on {args.device}, torch threads {torch.get_num_threads()}"
    )

    # naive: one pair at a time through generate(max_new_tokens=1)
    t0 = time.perf_counter()
    naive = []
    with torch.no_grad():
        for it in items:
            enc = processor(
                text=[prompt_text(processor, it.parts)],
                images=[load_image(i) for i in it.images],
                return_tensors="pt",
            ).to(args.device)
            out = model.generate(
                **enc,
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            naive.append(float(torch.softmax(out.scores[0][0, [yes, no]].double(), 0)[0]))
    sync()
    naive_s = time.perf_counter() - t0
    naive_rate = len(items) / naive_s
    print(f"naive generate, one pair at a time: {naive_rate:8.1f} pairs/s ({naive_s:.1f} s)", flush=True)

    rates = {}
    for sharing in (False, True):
        times = []
        for _ in range(args.repeats):
            scorer = TransformersScorer(
                model, processor, model_id="bench", batch_size=args.batch, prefix_sharing=sharing
            )
            t0 = time.perf_counter()
            scores = scorer.score(items)
            sync()
            times.append(time.perf_counter() - t0)
            assert all(s.ok for s in scores), [s.error for s in scores if not s.ok][:3]
        diff = max(abs(a - s.p_yes) for a, s in zip(naive, scores, strict=True))
        seconds = statistics.median(times)
        rates[sharing] = len(items) / seconds
        name = "shared query prefixes (default)" if sharing else "no prefix sharing"
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(
            f"assay transformers backend, batch {args.batch}, {name}: {rates[sharing]:8.1f} pairs/s "
            f"(median of {runs} s; max |p_yes - naive| {diff:.2e})",
            flush=True,
        )
    print(f"prefix_sharing_speedup={rates[True] / rates[False]:.2f}")
    print(f"speedup_vs_naive_generate={rates[True] / naive_rate:.2f}")


if __name__ == "__main__":
    main()
