"""Peak memory of a GradCache step at contrastive batch 1024 against batch 64, same mini-batch.

One training step of a contrastive (query, positive) batch through a small transformer encoder
(torch.nn.TransformerEncoder, random weights, dropout on, token ids of length --seq-len, mean pooled
and L2-normalised), with the InfoNCE loss (temperature 0.03, in-batch negatives) and GradCache
(training/losses). The encoder is large enough that its activations, not its weights, are what a
step adds to memory. Each measurement runs in a fresh subprocess so that peaks do not mix:

- CPU (default): peak RSS (``resource.getrusage(...).ru_maxrss``), with glibc told to mmap every
  allocation above 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident
  set: otherwise glibc keeps freed blocks (its threshold grows with the sizes it sees) and the
  peak RSS adds allocator retention to live memory. The GradCache runs are repeated with glibc's
  defaults and printed too (``--skip-glibc-default`` leaves them out);
- GPU (``--device cuda``): ``torch.cuda.max_memory_allocated``, after one untimed warm-up step
  (on the CPU only a warm-up on 2 inputs: peak RSS cannot be reset, a full one would hide the peak).

The "step peak" is the peak during the step minus the memory in use before it (process, torch,
weights and inputs): what the step itself costs. GradCache keeps one mini-batch's graph alive at a
time, so its step peak should barely grow with the batch (the representations and the B x B logits
are all that grow). The same batch without GradCache (plain backward through the whole batch) is
run too when its estimate (16 x its batch-64 step peak) fits in --plain-limit-gb and the free
memory; otherwise it is skipped with a note. (Its loss differs a little from GradCache's: dropout
masks are drawn per mini-batch there and per batch here; the tests check GradCache's gradients.)

    python bench/gradcache_memory.py                 # CPU, about a minute on 2 cores
    python bench/gradcache_memory.py --device cuda   # larger settings are fine on a GPU

Prints each run's peaks and time per step; the last line is
``peak_memory_ratio_1024_vs_64=X`` (GradCache step peak at 1024 / at 64; target X <= 1.3).
Only torch is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1024, help="the large contrastive batch")
    ap.add_argument("--small-batch", type=int, default=64, help="the batch it is compared with")
    ap.add_argument("--mini-batch", type=int, default=32, help="GradCache mini-batch (both runs)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per run")
    ap.add_argument(
        "--plain-limit-gb",
        type=float,
        default=8.0,
        help="run the plain (no GradCache) large batch only if its estimated step peak is below this",
    )
    ap.add_argument("--skip-plain", action="store_true", help="do not run the plain (no GradCache) steps")
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=131072,
        help="CPU: MALLOC_MMAP_THRESHOLD_ of the measuring processes, so that freed tensors leave the "
        "resident set and peak RSS follows live memory (0: glibc's default, dynamic threshold)",
    )
    ap.add_argument(
        "--skip-glibc-default",
        action="store_true",
        help="CPU: do not repeat the GradCache runs with glibc's default allocator settings",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "gradcache:1024" in a child
    return ap.parse_args(argv)


# --- one measurement (in a fresh process) -------------------------------------------------------


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from assay.training.losses import GradCache, InfoNCELoss

    mode, batch = args.worker.split(":")
    batch = int(batch)
    device = torch.device(args.device)
    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(args.vocab, args.d_model)
            self.pos = torch.nn.Parameter(torch.randn(args.seq_len, args.d_model) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(
                args.d_model, args.heads, 4 * args.d_model, dropout=0.1, batch_first=True
            )
            self.encoder = torch.nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.encoder(self.embed(ids) + self.pos)
            return torch.nn.functional.normalize(h.mean(dim=1), dim=-1)

    model = Encoder().to(device).train()
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(0, args.vocab, (batch, args.seq_len), generator=g).to(device)
    docs = torch.randint(0, args.vocab, (batch, args.seq_len), generator=g).to(device)
    loss_fn = InfoNCELoss()  # temperature 0.03, in-batch negatives
    # Warm the kernels and autograd on 2 inputs: a first step pays one-time costs (a backward with
    # explicit gradients, as GradCache's, imports sympy: ~0.7 s and tens of MiB, once per process),
    # and a graph of 2 inputs leaves a negligible peak behind (peak RSS cannot be reset on the CPU).
    out = model(queries[:2])
    torch.autograd.backward(out, grad_tensors=torch.ones_like(out))
    model.zero_grad(set_to_none=True)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if mode == "gradcache":
            loss = GradCache(model, loss_fn, args.mini_batch)(queries, docs)
        else:
            loss = loss_fn(model(queries), model(docs))
            loss.backward()
            loss = loss.detach()
        return float(loss)

    def rss_bytes() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    times, losses = [], []
    try:
        if device.type == "cuda":
            step()  # warm-up (kernel selection, allocator); its peak is forgotten just below
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_bytes()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"mode": mode, "batch": batch, "oom": True}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes()
    return {
        "mode": mode,
        "batch": batch,
        "before": before,
        "peak": peak,
        "step_peak": peak - before,
        "s_per_step": min(times),
        "loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
    }


# --- driver -------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, mode: str, batch: int, glibc_default: bool = False) -> dict:
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", f"{mode}:{batch}"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if args.device == "cpu" and args.malloc_mmap_threshold > 0 and not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    elif glibc_default:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{mode} batch {batch}: the measuring process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:8.1f} MiB"


def report(r: dict, unit: str) -> None:
    if r.get("oom"):
        print(f"{r['mode']:>9} batch {r['batch']:5d}: out of memory")
        return
    print(
        f"{r['mode']:>9} batch {r['batch']:5d}: step peak {mib(r['step_peak'])}  "
        f"({unit} {mib(r['peak'])}, before the step {mib(r['before'])})  "
        f"{r['s_per_step']:7.2f} s/step  loss {r['loss']:.4f}"
    )


def free_bytes(device: str) -> float:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    unit = "max allocated" if args.device == "cuda" else "peak RSS"
    print(
        f"device={args.device} encoder: {args.layers} x TransformerEncoderLayer(d={args.d_model}, "
        f"heads={args.heads}, ff={4 * args.d_model}, dropout 0.1), seq_len={args.seq_len}; "
        f"contrastive batch = that many (query, positive) pairs, InfoNCE t=0.03; "
        f"GradCache mini-batch {args.mini_batch}; one fresh process per run"
    )
    if args.device == "cpu" and args.malloc_mmap_threshold > 0:
        print(
            f"CPU runs use MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}: tensors above it are "
            f"mmapped and given back when freed, so peak RSS follows live memory"
        )
    small = run_child(args, "gradcache", args.small_batch)
    report(small, unit)
    large = run_child(args, "gradcache", args.batch)
    report(large, unit)

    if not args.skip_plain:
        plain_small = run_child(args, "plain", args.small_batch)
        report(plain_small, unit)
        if not plain_small.get("oom"):
            estimate = plain_small["step_peak"] * args.batch / args.small_batch
            limit = min(args.plain_limit_gb * 2**30, 0.8 * free_bytes(args.device))
            if estimate <= limit:
                report(run_child(args, "plain", args.batch), unit)
            else:
                print(
                    f"    plain batch {args.batch:5d}: skipped, estimated step peak {mib(estimate).strip()} "
                    f"is above the limit {mib(limit).strip()} (--plain-limit-gb, free memory)"
                )

    live = args.device == "cpu" and args.malloc_mmap_threshold > 0
    if live and not args.skip_glibc_default:
        print("the same GradCache runs with glibc's default allocator settings (freed blocks stay resident):")
        small_d = run_child(args, "gradcache", args.small_batch, glibc_default=True)
        report(small_d, unit)
        large_d = run_child(args, "gradcache", args.batch, glibc_default=True)
        report(large_d, unit)
        print(
            f"  glibc default: step peak ratio {large_d['step_peak'] / small_d['step_peak']:.3f}, "
            f"{unit} ratio (whole process) {large_d['peak'] / small_d['peak']:.3f}"
        )

    raw_ratio = large["peak"] / small["peak"]
    print(f"GradCache {unit} ratio {args.batch} vs {args.small_batch} (whole process): {raw_ratio:.3f}")
    print(
        f"GradCache time per step {args.batch} vs {args.small_batch}: "
        f"{large['s_per_step'] / small['s_per_step']:.1f}x for {args.batch / args.small_batch:.0f}x the pairs"
    )
    print(
        f"peak_memory_ratio_{args.batch}_vs_{args.small_batch}={large['step_peak'] / small['step_peak']:.3f}"
    )


if __name__ == "__main__":
    main()
