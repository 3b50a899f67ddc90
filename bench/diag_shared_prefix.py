"""Diagnostic: where the shared-prefix judge path departs from the plain one (run on a GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
import bench.judge_throughput as bj  # noqa: E402
from assay.curation.judge.hf import TransformersScorer  # noqa: E402
from assay.curation.judge.prompts import images_of, load_prompt, render  # noqa: E402
from assay.curation.judge.scoring import JudgeItem  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
pairs, labels = bj._pairs(256, 8)
t = load_prompt("vqa")
items = [JudgeItem(render(t, q, d), images_of(q, d), t.labels) for q, d in pairs]
print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
for attn in ("sdpa", "eager", "sdpa-notf32"):
    torch.backends.cudnn.allow_tf32 = attn != "sdpa-notf32"
    attn = attn.split("-")[0]
    model, proc = build_tiny(
        [q["text"] for q, _ in pairs] + labels, tokens_per_tile=16, patch_size=4, hidden_size=64, num_layers=2
    )
    model.config._attn_implementation = attn
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn
    model.to(device).eval()
    for bs in (64, 8, 1):
        a = TransformersScorer(model, proc, model_id="x", batch_size=bs, prefix_sharing=False).score(items)
        b = TransformersScorer(model, proc, model_id="x", batch_size=bs).score(items)
        d = [abs(x.p_yes - y.p_yes) for x, y in zip(a, b, strict=True)]
        print(
            f"{device} attn={attn} batch={bs}: max diff {max(d):.2e}, rows > 1e-4: {sum(x > 1e-4 for x in d)}/{len(d)}"
        )
    s = TransformersScorer(model, proc, model_id="x", batch_size=8)
    a = TransformersScorer(model, proc, model_id="x", batch_size=8, prefix_sharing=False).score(items[:8])
    b = s.score(items[:8])
    print(
        "  first group, per row:", " ".join(f"{x.p_yes:.5f}/{y.p_yes:.5f}" for x, y in zip(a, b, strict=True))
    )
