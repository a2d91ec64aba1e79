#!/usr/bin/env bash
# Compile one CUDA source alone (no link) with ptxas -v and print registers / spills / smem per kernel.
# Usage: tools/cuda_emulate/ptxas_usage.sh csrc/cuda/attention.cu 80   (run from the repo root)
set -euo pipefail
SRC=${1:-csrc/cuda/attention.cu}
ARCH=${2:-80}
PY=${PYTHON:-/work/main/.venv/bin/python}
INC=$($PY - <<'PYEOF'
import sys; sys.path.insert(0, "tools")
from cuda_env import nvidia_pip_include_dirs
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + d for d in include_paths() + nvidia_pip_include_dirs()))
PYEOF
)
CUDA_HOME=${CUDA_HOME:-$($PY -c 'import sys; sys.path.insert(0,"tools"); from cuda_env import find_cuda_home; print(find_cuda_home())')}
OUT=$(mktemp --suffix=.o)
"$CUDA_HOME/bin/nvcc" -c "$SRC" -o "$OUT" -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr \
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -U__CUDA_NO_HALF2_OPERATORS__ -DFASTATTN_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
  -Icsrc $INC -Xcompiler -fPIC -gencode "arch=compute_${ARCH},code=sm_${ARCH}" --resource-usage 2>&1 \
  | tee /dev/stderr | $PY tools/cuda_emulate/ptxas_summary.py
rm -f "$OUT"
