#!/usr/bin/env bash
# Run the course's full benchmark on an AMD GPU (ROCm) and write results/<device>/ in the same format as the
# NVIDIA results, so the chapters show both. One command, from anywhere:
#
#   benchmarks/amd.sh            # every chapter's benchmark with the committed (or fallback) config tables
#   benchmarks/amd.sh --tune     # tune this GPU's tables first (writes triton_moe/tables/*.json), then measure
#   benchmarks/amd.sh --quick    # fewer batch sizes
#
# Needs ROCm PyTorch (torch.version.hip set) and the Triton it ships with; PYTHON picks the interpreter.
# Then commit results/<device>/ (and triton_moe/tables/ if you tuned) to contribute the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" - <<'PYEOF'
import sys
import torch
hip = getattr(torch.version, "hip", None)
if not hip:
    sys.exit("amd.sh: this PyTorch is not a ROCm build (torch.version.hip is None). Install the ROCm wheel "
             "from https://pytorch.org/get-started/locally/ (pip install torch --index-url "
             "https://download.pytorch.org/whl/rocm<version>), or use benchmarks/run_all.py on NVIDIA.")
if not torch.cuda.is_available():
    sys.exit(f"amd.sh: ROCm PyTorch (HIP {hip}) sees no GPU: check /dev/kfd, /dev/dri and HIP_VISIBLE_DEVICES")
print(f"amd.sh: {torch.cuda.get_device_name(0)}, HIP {hip}, torch {torch.__version__}")
PYEOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m triton_moe info
exec "$PY" benchmarks/run_all.py "$@"
