#!/usr/bin/env bash
# Build mind_tower against the libtorch inside the Python environment's torch wheel (headers and
# libraries ship in the wheel; the same works with a libtorch download: point TORCH_DIR at it).
#   bash examples/aoti_cpp/build.sh [python] [output binary]
set -euo pipefail
PY=${1:-python}
OUT=${2:-$(dirname "$0")/mind_tower}
TORCH_DIR=${TORCH_DIR:-$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')}
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))' 2>/dev/null || echo 1)
${CXX:-g++} -std=c++20 -O2 "$(dirname "$0")/main.cpp" -o "$OUT" \
  -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
  -isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include" \
  -L"$TORCH_DIR/lib" -Wl,-rpath,"$TORCH_DIR/lib" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -ldl
echo "built $OUT"
