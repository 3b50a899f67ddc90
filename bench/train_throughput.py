"""Trainer throughput: `assay train` against a plain transformers loop, same model, rows and steps.

The quickstart's tiny configs (examples/quickstart.yaml: ``stage1`` and ``stage2-warmup``, batch
32) run ``--steps`` steps each, twice over:

- ``assay train``: ``training.trainer.train`` (what the command calls), its inputs prepared ahead
  on the input thread from the input cache (training/inputs.py, training/input_cache.py), as
  ``assay loop`` runs the stages: stage 1 starts with an empty cache (the processor runs once per
  new image and prompt, on the input thread), stage 2 with what stage 1 left in it (the images
  prepared, its prompts new). ``--warm`` adds a rerun of each stage over the cache it filled;
- the plain loop: per step, the model's processor on the batch's rows (images read from their
  files), forward, backward, clip, AdamW: the loop one writes with transformers alone. Stage 1 calls
  ``training.generative.build_batch``, stage 2 ``MMEmbedder.prepare`` per side, then InfoNCE.

Both see the same batches (``training.data.epoch_batches`` of the same seed), start from the same
weights (stage 2: the stage-1 checkpoint) and run in this process, alternated ``--repeats`` times
(each repeat with a cache of its own), so a load spike on a shared machine does not favour one;
the fastest run of each counts. A step's time is its wall time, waiting for inputs included; the
first ``--warmup`` steps of each run are left out. The model's forward (``MMEmbedder.forward``,
``next_token_loss``) and backward (``torch.autograd.backward``) are timed by wrappers (synchronised
on a GPU), so ``outside`` is the share of a step spent elsewhere: the processor, waiting, copying,
the optimizer.

    assay ingest easy-vqa runs/ev --format example      # optional: --data runs/ev, else built here
    python bench/train_throughput.py                                  # CPU, the quickstart's tiny model
    python bench/train_throughput.py --device cuda --shape internvl3-2b   # InternVL3-2B shapes, bf16

``--shape internvl3-2b`` is InternViT-300M-448px + Qwen2.5-1.5B written in code (training/tiny.py),
random weights, 64 tokens per tile, bf16 autocast with fp32 master weights, batch 16, a tokenizer
trained here (nothing is downloaded). Prints one line per stage and run, and as its last line
``train_speedup_vs_plain_loop=X step_overhead=F``: X the plain loop's total step time over assay's
(stages 1 and 2 together, not the reruns), F assay's larger per-stage share of step time outside
the model's forward and backward.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: examples/quickstart.yaml's stage1 and stage2-warmup, less what the bench sets itself.
STAGE1 = {"stage": "1", "tiny": {"patch_size": 4}, "tokens_per_tile": 16, "lr": 1.0e-3}
STAGE2 = {"stage": "2", "lora": None, "lr": 1.0e-4, "temperature": 0.05, "batching": "subset"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=None, help="an `assay ingest easy-vqa` folder (default: built in --work)"
    )
    ap.add_argument("--work", default="runs/bench-train", help="data, checkpoints and caches go here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "internvl3-2b"])
    ap.add_argument("--steps", type=int, default=30, help="steps per stage and run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the timing")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (tiny), 16 (internvl3-2b)")
    ap.add_argument("--warm", action="store_true", help="also time assay over the cache its first run filled")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each loop, alternated; the best counts (2; 1 on 2B)",
    )
    args = ap.parse_args(argv)
    args.batch = args.batch or (32 if args.shape == "tiny" else 16)
    args.repeats = args.repeats or (2 if args.shape == "tiny" else 1)
    return args


# ---------------------------------------------------------------- timing


class Clock:
    """Time spent in the model's forward and backward, and where each optimizer step begins."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch = cuda, torch
        self.fwd = self.bwd = 0.0
        self.marks: list[tuple[float, float]] = []  # (fwd, bwd) totals at each step's gradient clip
        self._depth = 0

    def wrap(self, fn, kind: str):
        def timed(*a, **k):
            if self._depth:
                return fn(*a, **k)
            self._sync()
            t = time.perf_counter()
            self._depth += 1
            try:
                return fn(*a, **k)
            finally:
                self._depth -= 1
                self._sync()
                setattr(self, kind, getattr(self, kind) + time.perf_counter() - t)

        return timed

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def install(self) -> None:
        import torch

        import assay.training.generative as generative
        import assay.training.steps as steps
        from assay.training.model import MMEmbedder

        MMEmbedder.forward = self.wrap(MMEmbedder.forward, "fwd")
        for module in (generative, steps):
            module.next_token_loss = self.wrap(module.next_token_loss, "fwd")
        torch.autograd.backward = self.wrap(torch.autograd.backward, "bwd")
        clip = torch.nn.utils.clip_grad_norm_

        def clip_and_mark(*a, **k):  # every loop clips once per step, after the backward
            self.marks.append((self.fwd, self.bwd))
            return clip(*a, **k)

        torch.nn.utils.clip_grad_norm_ = clip_and_mark

    def model_seconds(self, first_mark: int) -> list[float]:
        """Forward + backward seconds of each step whose clip came at ``marks[first_mark:]``."""
        marks = self.marks[first_mark:]
        prev = [self.marks[first_mark - 1] if first_mark else (0.0, 0.0)] + marks[:-1]
        return [(f - pf) + (b - pb) for (f, b), (pf, pb) in zip(marks, prev, strict=True)]


def summary(step_seconds: list[float], model_seconds: list[float], warmup: int, waited=None) -> dict:
    steps, model = step_seconds[warmup:], model_seconds[warmup:]
    out = {
        "steps": len(steps),
        "seconds": sum(steps),
        "steps_per_s": len(steps) / sum(steps),
        "outside": 1 - sum(model) / sum(steps),
    }
    if waited is not None:
        out["waited"] = sum(waited[warmup:]) / sum(steps)
    return out


# ---------------------------------------------------------------- the two loops


def run_assay(config: dict, clock: Clock, warmup: int) -> dict:
    from assay.training.config import config_from_dict
    from assay.training.trainer import LOG_FILE, train

    first = len(clock.marks)
    t0 = time.perf_counter()
    final = train(config_from_dict(config))
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(config["output"]) / LOG_FILE).read_text().splitlines()]
    result = summary(
        [e["seconds"] for e in log],
        clock.model_seconds(first),
        warmup,
        [e["input_wait_seconds"] for e in log],
    )
    return result | {"wall": wall, "final": str(final)}


def run_plain(config: dict, init: str | None, clock: Clock, warmup: int, device: str) -> dict:
    """The plain loop: the processor on every batch, then forward, backward, clip, AdamW."""
    import torch

    from assay.training.data import TrainingData, epoch_batches, generative_sample
    from assay.training.generative import build_batch, next_token_loss, sample_from_input
    from assay.training.losses import InfoNCELoss
    from assay.training.model import load_embedder

    t0 = time.perf_counter()
    data = TrainingData.load(config["data"])
    embedder = load_embedder(init).to(device).train()
    stage1 = config["stage"] == "1"
    units = (
        data.generative_units()
        if stage1
        else [(u.query, u.positive) for u in data.contrastive_units("none", 0)]
    )
    batches = epoch_batches(
        [data.subset_of(q) for q, _ in units],
        config["batch_size"],
        seed=0,
        epoch=0,
        batching=config.get("batching", "subset"),
        max_units_per_subset=config["max_units_per_subset"],
    )[: config["max_steps"]]
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"])
    infonce = InfoNCELoss(temperature=config.get("temperature", 0.05))
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    first, times = len(clock.marks), []
    start_up = time.perf_counter() - t0
    for batch in batches:
        t = time.perf_counter()
        pairs = [units[i] for i in batch]
        optimizer.zero_grad(set_to_none=True)
        with amp:
            if stage1:
                samples = []
                for q, d in pairs:
                    inp, target = generative_sample(data.queries[q], data.corpus[d])
                    samples.append(sample_from_input(inp, target))
                inputs = build_batch(embedder, samples).items()
                tensors = {k: v.to(device) for k, v in inputs}
                loss, count = next_token_loss(embedder, tensors)
                (loss / max(count, 1)).backward()
            else:
                q = embedder.prepare([data.queries[q] for q, _ in pairs], "query").to(device)
                p = embedder.prepare([data.corpus[d] for _, d in pairs], "candidate").to(device)
                exclude = torch.tensor(
                    [
                        [j != i and d in data.excluded(qi) for j, (_, d) in enumerate(pairs)]
                        for i, (qi, _) in enumerate(pairs)
                    ]
                )
                loss = infonce(embedder(**q), embedder(**p), exclude=exclude)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        float(loss.detach())
        times.append(time.perf_counter() - t)
    return summary(times, clock.model_seconds(first), warmup) | {"start_up": start_up}


# ---------------------------------------------------------------- set-up


def easy_vqa(args: argparse.Namespace) -> Path:
    if args.data:
        return Path(args.data)
    out = Path(args.work) / "easy-vqa"
    if not (out / "train" / "manifest.json").is_file():
        from assay.curation.examples import ingest_example

        print(f"building the easy-vqa example in {out} (once)", flush=True)
        ingest_example("easy-vqa", out)
    return out


def internvl3_2b_init(work: Path, texts_from: Path, device: str) -> Path:
    """A random-weight InternVL3-2B-shaped assay checkpoint (fp32), with a tokenizer trained here."""
    import torch

    from assay.training.data import TrainingData
    from assay.training.model import CompressedInternVLForConditionalGeneration, MMEmbedder
    from assay.training.tiny import LABEL_WORDS, build_processor, internvl3_2b_config, train_tokenizer

    path = work / "init-internvl3-2b"
    if (path / "config.json").is_file():
        return path
    data = TrainingData.load([str(texts_from)])
    texts = {
        r[k]
        for rows in (data.queries, data.corpus)
        for r in rows
        for k in ("text", "instruction")
        if r.get(k)
    }
    tokenizer = train_tokenizer(["Instruct: Query: Text:", *sorted(texts)], vocab_size=4096)
    tokenizer.add_tokens(list(LABEL_WORDS))
    config = internvl3_2b_config(tokens_per_tile=64, image_token_id=tokenizer.context_image_token_id)
    config.text_config.eos_token_id, config.text_config.pad_token_id = (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    with torch.device(device):
        torch.manual_seed(0)
        model = CompressedInternVLForConditionalGeneration(config)
    processor = build_processor(tokenizer, image_size=448, tokens_per_tile=64)
    MMEmbedder(model.cpu(), processor).save_pretrained(path)
    return path


def _free(init, out: Path) -> None:
    """Delete a run's checkpoints (needed on the 2B shape), and what the GPU still holds of it."""
    import gc

    import torch

    if init is not None:
        shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def line(name: str, r: dict) -> str:
    waited = f", waiting for inputs {100 * r['waited']:.1f}%" if "waited" in r else ""
    return (
        f"  {name:<18} {r['steps_per_s']:6.2f} steps/s ({1000 * r['seconds'] / r['steps']:.0f} ms a step over "
        f"{r['steps']} steps, outside forward/backward {100 * r['outside']:.1f}%{waited})"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import platform

    import torch

    from assay.pipelines.commands.common import quiet_transformers

    quiet_transformers()
    work = Path(args.work)
    data = easy_vqa(args)
    run = work / time.strftime("run-%Y%m%d-%H%M%S")
    cuda = args.device == "cuda"
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    where = torch.cuda.get_device_name() if cuda else f"{cpu}, {torch.get_num_threads()} threads"
    print(
        f"device: {args.device} ({where}); shape {args.shape}; batch {args.batch}; {args.steps} steps/stage",
        flush=True,
    )
    clock = Clock(cuda)
    clock.install()
    common = {
        "data": [str(data / "train")],
        "batch_size": args.batch,
        "mini_batch": args.batch,
        "max_units_per_subset": 1500,
        "max_steps": args.steps,
        "save_every": 10**6,
        "keep_checkpoints": 1,
        "device": args.device,
        "progress": False,
        "input_cache": str(run / "cache" / "inputs"),
    }
    init = internvl3_2b_init(work, data / "train", args.device) if args.shape != "tiny" else None
    stage1 = (
        {**common, **STAGE1}
        if init is None
        else {**common, **STAGE1, "tiny": None, "init": str(init), "tokens_per_tile": 64}
    )
    results: dict[str, dict] = {}
    stage1_final = None
    for stage, config in (("1", stage1), ("2", {**common, **STAGE2})):
        if stage == "2":
            config["init"] = str(init or stage1_final)
        print(
            f"stage {stage} ({'next-token' if stage == '1' else 'InfoNCE, in-batch negatives'}):", flush=True
        )
        runs: dict[str, list[dict]] = {"assay": [], "warm": [], "plain": []}
        for r in range(args.repeats):  # alternated, so a load spike on a shared machine hits both
            # as `assay loop` runs them: stage 1 into a new, empty cache, stage 2 over what stage 1
            # left there (the images prepared, the prompts new); each repeat has its own cache
            cache = str(run / f"cache-{r}")
            out = run / f"stage{stage}-{r}"
            assay = run_assay({**config, "output": str(out), "input_cache": cache}, clock, args.warmup)
            runs["assay"].append(assay)
            print(line("assay" + (", new cache" if stage == "1" else ", stage 1's cache"), assay), flush=True)
            if stage == "1" and stage1_final is None:
                stage1_final = assay["final"]
            _free(init, out)  # on the 2B shape a checkpoint with its optimizer is ~25 GB
            if args.warm:
                warm_out = run / f"stage{stage}-{r}-warm"
                runs["warm"].append(
                    run_assay({**config, "output": str(warm_out), "input_cache": cache}, clock, args.warmup)
                )
                print(line("assay, run again", runs["warm"][-1]), flush=True)
                _free(init, warm_out)
            runs["plain"].append(
                run_plain(config, config.get("init") or stage1_final, clock, args.warmup, args.device)
            )
            print(line("plain loop", runs["plain"][-1]), flush=True)
            _free(None, out)
        best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items() if v}
        results[stage] = best
        print(
            f"  best of {args.repeats}: speedup {best['plain']['seconds'] / best['assay']['seconds']:.2f}x",
            flush=True,
        )
    speedup = sum(r["plain"]["seconds"] for r in results.values()) / sum(
        r["assay"]["seconds"] for r in results.values()
    )
    overhead = max(r["assay"]["outside"] for r in results.values())
    print(f"train_speedup_vs_plain_loop={speedup:.2f} step_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
