#!/usr/bin/env bash
# CI: the install paths a user takes, each in a fresh virtual environment that has torch and nothing else.
#   1. python -m build --no-isolation: an sdist, then a wheel built from it (so the sdist is complete),
#      with the torch of $CPU_VENV (the CPU build 2.13.0: C++ kernels only, to keep this quick).
#   2. that wheel in a fresh venv with the same torch: the kernels load and pass the quick self-test, run
#      from another folder so the installed package is used, not this source tree; torch is not touched.
#   3. the [mind] extra: `python -m mind --help` and a one-epoch training run on toy data.
#   4. a plain `pip install .` (build isolation on): stops within seconds with setup.py's message, which
#      names the command to type, and without a traceback (README "Install" says why it must stop).
# Needs $CPU_VENV with torch and `build` (make test-cpu-only makes it). About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CPU_VENV=${CPU_VENV:-.venv-cpu}
CPU_TORCH_SPEC=${CPU_TORCH_SPEC:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
PIP_FLAGS=(--disable-pip-version-check --progress-bar off)
WORK=$(mktemp -d /tmp/mind-kernels-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
step() { echo; echo "[check-install $1] $2 (at $(( $(date +%s) - T0 )) s)"; }
fail() { echo "check-install FAILED: $*" >&2; exit 1; }

make --no-print-directory setup VENV="$CPU_VENV" TORCH_SPEC="$CPU_TORCH_SPEC"
"$CPU_VENV/bin/python" -c "import build" 2>/dev/null || "$CPU_VENV/bin/python" -m pip install -q "${PIP_FLAGS[@]}" build

step 1/4 "python -m build --no-isolation: sdist, then a wheel from it, against $CPU_TORCH_SPEC (~3 min)"
"$CPU_VENV/bin/python" -m build --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log"; fail "python -m build --no-isolation"; }
WHEEL=$(ls "$WORK"/dist/mind_kernels-*.whl)
echo "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KB) and $(basename "$(ls "$WORK"/dist/*.tar.gz)")"
"$CPU_VENV/bin/python" - "$WHEEL" <<'EOF'
import json, re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if n.startswith("mind_kernels/_C") and n.endswith(".so")]
assert so, f"no compiled extension in the wheel: {names}"
assert "mind_kernels/_build_info.json" in names and "mind/cli.py" in names, names
info = json.loads(zipfile.ZipFile(sys.argv[1]).read("mind_kernels/_build_info.json"))
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
torch_req = [l for l in meta.splitlines() if re.match(r"Requires-Dist: torch\b(?!-)", l)]
print(f"wheel holds {so[0]}; built for torch {info['torch']}, CUDA kernels: {info['built_cuda']}; {torch_req[0]}")
major_minor = ".".join(info["torch"].split("+")[0].split(".")[:2])
assert torch_req == [f"Requires-Dist: torch=={major_minor}.*"], torch_req
EOF

step 2/4 "the wheel in a fresh venv with $CPU_TORCH_SPEC, run from another folder"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q "${PIP_FLAGS[@]}" --upgrade pip
"$V" -m pip install -q "${PIP_FLAGS[@]}" "$CPU_TORCH_SPEC"
TORCH_BEFORE=$("$V" -c "import torch; print(torch.__version__)")
"$V" -m pip install "${PIP_FLAGS[@]}" "$WHEEL" | sed -n '/^Successfully/p'
cd "$WORK"   # from here on, `import mind_kernels` must find the installed wheel, not $REPO
"$V" - "$TORCH_BEFORE" <<'EOF'
import os, sys, sysconfig, torch, mind_kernels, mind_kernels.ops as ops
site = sysconfig.get_paths()["purelib"]
assert mind_kernels.__file__.startswith(site), f"imported {mind_kernels.__file__}, not the wheel in {site}"
assert ops._C is not None, ops._LOAD_ERROR
assert torch.__version__ == sys.argv[1], f"installing the wheel changed torch {sys.argv[1]} -> {torch.__version__}"
print(f"mind_kernels {mind_kernels.__version__} from {os.path.dirname(mind_kernels.__file__)}; "
      f"_C loaded; torch still {torch.__version__}")
EOF
"$V" -m mind_kernels.selftest --quick | tail -n 4

step 3/4 "the [mind] extra: python -m mind --help, and one epoch on toy data"
"$V" -m pip install "${PIP_FLAGS[@]}" "$WHEEL[mind]" | sed -n '/^Successfully/p'
"$V" -m mind --help > "$WORK/help.txt" || { cat "$WORK/help.txt"; fail "python -m mind --help"; }
head -n 2 "$WORK/help.txt"
"$V" -m mind train --data synthetic --users 60 --items 80 --epochs 1 --dim 16 \
  --out "$WORK/run" --no-progress > "$WORK/train.log" 2>&1 || { tail -n 30 "$WORK/train.log"; fail "mind train"; }
tail -n 2 "$WORK/train.log"

step 4/4 "plain pip install . (build isolation on) must stop at once, saying what to type"
start=$(date +%s)
set +e
"$V" -m pip install "${PIP_FLAGS[@]}" "$REPO" > "$WORK/plain.log" 2>&1
rc=$?
set -e
took=$(( $(date +%s) - start ))
[ "$rc" -ne 0 ] || fail "plain pip install . succeeded; README says it stops (update both if that changed)"
grep -q 'pip install --no-build-isolation ".\[mind\]"' "$WORK/plain.log" || { cat "$WORK/plain.log"; fail "no hint in the output"; }
! grep -q "Traceback" "$WORK/plain.log" || { cat "$WORK/plain.log"; fail "a traceback"; }
[ "$took" -le 120 ] || fail "took $took s to fail"
"$V" -c "import mind_kernels, sys; sys.exit(0 if 'site-packages' in mind_kernels.__file__ else 1)" \
  || fail "the failed plain install changed the installed package"
echo "failed as documented in $took s (exit $rc), the message:"
sed -n '/error: mind-kernels cannot import torch/,/add --no-isolation/p' "$WORK/plain.log"

cd "$REPO"
echo; echo "check-install passed in $(( $(date +%s) - T0 )) s"
