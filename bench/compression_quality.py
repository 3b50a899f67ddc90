"""Quality of compression: the same from-scratch recipe at 64 and at 256 tokens per tile, P@1 side by side.

Trains the tiny InternVL (training/tiny.py: a 32 x 32 vision grid, as a 448 px tile gives
InternViT) on the bundled easy-vqa train split, stage 1 (next-token) then stage 2 warm-up
(InfoNCE, in-batch negatives), once per tokens-per-tile setting with the same steps, batch and
seed, and evaluates each on the held-out test split (MMEB P@1 per subset)::

    assay ingest easy-vqa runs/ev --format example          # once: runs/ev/train, runs/ev/test
    python bench/compression_quality.py --data runs/ev --out runs/cq                      # CPU
    python bench/compression_quality.py --data runs/ev --out runs/cq --device cuda --steps1 600 --steps2 600

Each run goes through ``training.trainer.train`` and ``training.evaluate.evaluate``, the code
``assay train`` and ``assay eval`` run. Prints a table and, as its last line,
``p_at_1_gap_64_vs_256=X``: mean P@1 over subsets at 256 minus at 64, in points (X <= 2: within
the issue's 2 points). Rerunning resumes or reuses finished stages (their checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def recipe(args: argparse.Namespace, tokens: int, out: Path) -> dict:
    from assay.training.config import config_from_dict
    from assay.training.evaluate import evaluate
    from assay.training.model import load_embedder
    from assay.training.trainer import train

    common = {
        "data": [str(Path(args.data) / "train")],
        "batch_size": args.batch,
        "mini_batch": args.mini_batch,
        "max_units_per_subset": args.units_per_subset,
        "device": args.device,
        "progress": not args.quiet,
        "save_every": 100,
        "seed": args.seed,
        "epochs": 1000.0,  # max_steps decides
    }
    t0 = time.perf_counter()
    s1 = train(
        config_from_dict(
            {
                **common,
                "stage": "1",
                "output": str(out / "stage1"),
                "tiny": {},
                "tokens_per_tile": tokens,
                "lr": args.lr1,
                "max_steps": args.steps1,
            }
        )
    )
    s2 = train(
        config_from_dict(
            {
                **common,
                "stage": "2",
                "output": str(out / "stage2"),
                "init": str(s1),
                "lora": None,
                "lr": args.lr2,
                "temperature": args.temperature,
                "batching": args.batching,
                "max_steps": args.steps2,
            }
        )
    )
    seconds = time.perf_counter() - t0
    embedder = load_embedder(s2, device=args.device if args.device != "auto" else None)
    metrics = evaluate(
        Path(args.data) / "test",
        lambda rows: embedder.encode_queries(rows, batch_size=64),
        lambda rows: embedder.encode_candidates(rows, batch_size=64),
        batch_size=64,
        max_queries_per_subset=args.max_queries,
        progress=not args.quiet,
    )
    metrics["train_seconds"] = seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the easy-vqa example dir (with train/ and test/)")
    ap.add_argument("--out", required=True, help="where the runs go")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps1", type=int, default=150)
    ap.add_argument("--steps2", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--units-per-subset", type=int, default=1500)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--batching", default="mixed", choices=["mixed", "subset"])
    ap.add_argument("--max-queries", type=int, default=1000, help="test queries scored per subset")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    results = {t: recipe(args, t, Path(args.out) / f"tokens-{t}") for t in args.tokens}
    subsets = sorted(next(iter(results.values()))["per_subset"])
    print(f"{'tokens/tile':>11}  " + "  ".join(f"{s:>14}" for s in subsets) + "      mean  train s")
    chance = next(iter(results.values()))["chance_p_at_1"]
    print(f"{'chance':>11}  " + "  ".join(f"{chance[s]:>14.3f}" for s in subsets))
    for t, m in results.items():
        row = "  ".join(f"{m['per_subset'][s]['p_at_1']:>14.3f}" for s in subsets)
        print(f"{t:>11}  {row}  {m['overall']['p_at_1']:>8.3f}  {m['train_seconds']:>7.0f}")
    if 64 in results and 256 in results:
        gap = 100 * (results[256]["overall"]["p_at_1"] - results[64]["overall"]["p_at_1"])
        print(f"p_at_1_gap_64_vs_256={gap:.2f}")


if __name__ == "__main__":
    main()
