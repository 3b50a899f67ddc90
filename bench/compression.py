"""Embedding throughput and peak memory of InternVL at 256 (vanilla) and 64 tokens per tile.

The same architecture and the same weights' shapes, embedded twice: once as transformers' own
``InternVLForConditionalGeneration`` (256 tokens per 448 px tile), once with assay's parameter-free
bilinear downsampling before the pixel shuffle (training/model.py; 64 tokens per tile). Each batch is
``--batch`` image queries, ``Instruct: ... <img><IMG_CONTEXT>*T</img> Query: ...``, with
``--text-tokens`` text tokens around the image, through the vision tower, the connector and the
language model to the last token's L2-normalised hidden state (``MMEmbedder.forward``), in
inference mode. Token ids and pixels are random: the processor's work is the same in both settings
and is left out.

    python bench/compression.py                                          # CPU, tiny shape
    python bench/compression.py --shape internvl3-2b --device cuda       # InternVL3-2B shapes, bf16
    python bench/compression.py --shape internvl3-2b --device cuda --compile   # the same, torch.compile'd

``--shape tiny`` is training/tiny.py's configuration (its 32 x 32 vision grid is the real one's);
``internvl3-2b`` is InternViT-300M-448px + Qwen2.5-1.5B written in code, random weights. Each setting
runs in a fresh subprocess, so peaks do not mix: ``torch.cuda.max_memory_allocated`` on a GPU, peak
RSS (``ru_maxrss``) on the CPU. Last line: ``vanilla_vs_compressed_throughput_ratio=X``, compressed
images/s divided by vanilla images/s (X > 1: compression is faster). Needs only torch and
transformers (and the tokenizers and Pillow that come with them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: InternVL3's ids of <img>, </img>, <IMG_CONTEXT> (the tiny shape uses small ids of its own).
REAL_IMAGE_IDS = (151665, 151666, 151667)
TINY_IMAGE_IDS, TINY_VOCAB = (3, 4, 5), 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "internvl3-2b"])
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=32, help="text tokens per query besides the image")
    ap.add_argument("--iters", type=int, default=None, help="timed batches (default 10 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compressed", type=int, default=64, help="tokens per tile of the compressed run")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the embedder (both settings) before timing"
    )
    ap.add_argument("--vanilla", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # tokens per tile, in a child
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.iters = args.iters or (10 if args.device == "cuda" else 5)
    return args


def build_model(shape: str, tokens: int, vanilla: bool, device: str, dtype):
    """Random-weight model of the shape; transformers' class for vanilla, assay's for compressed."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from assay.training.model import CompressedInternVLForConditionalGeneration
    from assay.training.tiny import internvl3_2b_config, tiny_config

    if shape == "tiny":
        config = tiny_config(TINY_VOCAB, TINY_IMAGE_IDS[2], tokens_per_tile=tokens)
    else:
        config = internvl3_2b_config(tokens_per_tile=tokens, image_token_id=REAL_IMAGE_IDS[2])
    cls = InternVLForConditionalGeneration if vanilla else CompressedInternVLForConditionalGeneration
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_batch(args: argparse.Namespace, tokens: int, config, device: str, dtype) -> dict:
    """Random ids: half the text before the image, half after; one tile of random pixels per row."""
    import torch

    start, end, context = TINY_IMAGE_IDS if args.shape == "tiny" else REAL_IMAGE_IDS
    vocab = TINY_VOCAB if args.shape == "tiny" else 151643  # ordinary (non-special) ids
    g = torch.Generator().manual_seed(0)
    before = torch.randint(10, vocab, (args.batch, args.text_tokens // 2), generator=g)
    after = torch.randint(10, vocab, (args.batch, args.text_tokens - args.text_tokens // 2), generator=g)
    image = torch.tensor([start, *([context] * tokens), end]).expand(args.batch, -1)
    input_ids = torch.cat([before, image, after], dim=1)
    size = config.vision_config.image_size[0]
    pixels = torch.randn(args.batch, 3, size, size, generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def worker(args: argparse.Namespace) -> dict:
    """One setting, this process: build, warm up, time ``--iters`` batches, read the peaks."""
    import torch

    from assay.training.model import MMEmbedder

    tokens = args.worker
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    model = build_model(args.shape, tokens, tokens == args.vanilla, args.device, dtype)
    embedder = MMEmbedder(model)
    if args.compile:
        embedder = torch.compile(embedder, dynamic=False)
    batch = make_batch(args, tokens, model.config, args.device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before any forward (KiB)
    with torch.inference_mode():
        for _ in range(args.warmup):
            embedder(**batch)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = embedder(**batch)
        sync()
        seconds = time.perf_counter() - t0
    assert out.shape[0] == args.batch and torch.isfinite(out).all()
    result = {
        "tokens_per_tile": tokens,
        "model": type(model).__name__,
        "attention": str(getattr(model.config.vision_config, "_attn_implementation", None))
        + "/"
        + str(getattr(model.config.text_config, "_attn_implementation", None)),
        "seq_len": int(batch["input_ids"].shape[1]),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": args.batch * args.iters / seconds,
        "ms_per_batch": 1000 * seconds / args.iters,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_step_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_base) / 1024,
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_step_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def run_child(args: argparse.Namespace, tokens: int) -> dict:
    """Run one setting in a fresh interpreter and read its JSON line."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tokens)]
    if args.compile:
        argv.append("--compile")
    for flag in (
        "shape",
        "device",
        "dtype",
        "batch",
        "text_tokens",
        "iters",
        "warmup",
        "compressed",
        "vanilla",
    ):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {tokens}-token run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(r: dict, cuda: bool) -> str:
    memory = (
        f"peak GPU {r['peak_gpu_mib']:9.1f} MiB (forward adds {r['peak_gpu_step_mib']:8.1f})"
        if cuda
        else f"peak RSS {r['peak_rss_mib']:8.1f} MiB (forward adds {r['peak_rss_step_mib']:7.1f})"
    )
    return (
        f"{r['tokens_per_tile']:4d} tokens/tile  {r['model']:<44s} seq {r['seq_len']:4d}  "
        f"{r['images_per_s']:9.1f} images/s  {r['ms_per_batch']:9.1f} ms/batch  {memory}  "
        f"attention {r['attention']}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    cuda = args.device == "cuda"
    print(
        f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} "
        f"text_tokens={args.text_tokens} iters={args.iters} warmup={args.warmup} compile={args.compile}"
    )
    vanilla = run_child(args, args.vanilla)
    print(report(vanilla, cuda), flush=True)
    compressed = run_child(args, args.compressed)
    print(report(compressed, cuda), flush=True)
    if cuda:
        print(f"gpu={compressed['gpu']}")
        total, step = "peak_gpu_mib", "peak_gpu_step_mib"
    else:
        total, step = "peak_rss_mib", "peak_rss_step_mib"
    print(f"peak_memory_ratio_compressed_vs_vanilla={compressed[total] / vanilla[total]:.3f}")
    print(f"forward_memory_ratio_compressed_vs_vanilla={compressed[step] / max(vanilla[step], 1e-9):.3f}")
    ratio = compressed["images_per_s"] / vanilla["images_per_s"]
    print(f"vanilla_vs_compressed_throughput_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
