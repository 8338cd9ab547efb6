#!/usr/bin/env bash
# Prepares NVIDIA's AIPerf 0.13.0 (benchmarks/aiperf_run.py, issue #28) for the GPU machine, which has
# no network and may carry at most 64 MiB per call, the repository included.
# Run from the repo root; downloads are cached in ~/.cache/aiperf-carry.
#   bash scripts/prepare-gpu-aiperf-carry.sh              # writes .gpu-aiperf0 .. .gpu-aiperfN, prints the calls
#   bash scripts/prepare-gpu-aiperf-carry.sh --list-deps  # the carried requirements, one per line
# Then on the GPU machine, a server listening there (ours: gateway on :9000; vLLM's `vllm serve`: :8000),
# from the repository root, in the call that carries the last folder:
#   OUT=$OUT bash ~/aiperf-carry/run.sh --url http://127.0.0.1:9000 --model gemma \
#     --input-tokens 1024 --output-tokens 256 --concurrency 1,8,32 --endpoints completions
# run.sh installs the wheels once into ~/aiperf-site (a stamp file says so: a second run on the same
# machine carries nothing) and runs `python3 -m benchmarks.aiperf_run` with ~/aiperf-site first on
# PYTHONPATH and AIPERF_PYTHON=python3, so AIPerf runs as `python3 -m aiperf` on the machine's Python.
#
# What travels: DEPS below, the part of aiperf==0.13.0's dependency closure (cp312, manylinux) that
# `aiperf profile` imports and the machine's image (device KINDS.md's list) lacks, and run.sh. Not the
# tokenizer: run.sh takes the one .gpu-serving/run.sh or ~/vllm-carry/run.sh left in $WORK/tokenizer,
# else ~/vllm-carry/tokenizer.json.gz, else .gpu-serving/tokenizer.json.gz in the repository (carry
# .gpu-serving beside .gpu-aiperfN: 23 MB), else $TOKENIZER (a directory with tokenizer.json).
# Environment: AIPERF_CARRY_CACHE, AIPERF_CARRY_FOLDER_BYTES (58000000).
set -euo pipefail
PREFIX=.gpu-aiperf
CACHE=${AIPERF_CARRY_CACHE:-$HOME/.cache/aiperf-carry}
FOLDER_BYTES=${AIPERF_CARRY_FOLDER_BYTES:-58000000}  # at most, per folder: < 56 MiB leaves a call's 64 MiB room for the repo

# The closure is 139 distributions; the machine lacks 68 of them by name. Found by running
# benchmarks.aiperf_run (chat and completions, streamed, synthetic prompts, --ui none) through
# `python -m aiperf` against a stand-in server, on Python 3.11 seeing only the 71 the machine has (at
# .venv-aiperf's versions) plus these (their cp311 builds), adding back each module AIPerf found
# missing; not yet run on the GPU machine itself. The other 50 serve `aiperf plot` and its dashboard
# (plotly, dash, kaleido, flask), the Kubernetes operator (kopf, kubernetes_asyncio, fastapi, uvicorn,
# aiosqlite), sweeps (optuna, sqlalchemy, alembic), the live UI (textual), accuracy and audio datasets
# (datasets, soundfile), or take an `except ImportError` (setproctitle: process titles) or another
# endpoint (jmespath: template). The machine's own packages that this path imports (aiohttp, rich,
# psutil, aiofiles, uvloop, numpy, transformers...) stay theirs: run.sh says where AIPerf's pins differ.
DEPS=(
  aiperf==0.13.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic needs >= 4.14.1; the machine's is older (the vLLM carry found it)
  pydantic-settings==2.16.3 python-dotenv==1.2.4  # AIPerf's environment settings
  cyclopts==4.25.3 docstring-parser==0.18.0 rich-rst==2.2.0  # its command line
  pyzmq==26.4.0 msgspec==0.23.0 orjson==3.11.9  # messages between its service processes
  ruamel-yaml==0.18.17 ruamel-yaml-clib==0.2.15  # its plugin registry (plugins.yaml)
  crick==0.0.8  # streaming percentiles
  ffmpeg-python==0.2.0 future==1.0.0  # imported by the synthetic dataset composer (video), not run
)
source "$(dirname "${BASH_SOURCE[0]}")/carry_wheels.sh"

if [[ ${1:-} == --list-deps ]]; then printf '%s\n' "${DEPS[@]}"; exit 0; fi
[[ -f pyproject.toml && -d benchmarks ]] || { echo "run from the repository root" >&2; exit 1; }
((FOLDER_BYTES < 56 << 20)) || { echo "AIPERF_CARRY_FOLDER_BYTES must stay under 56 MiB" >&2; exit 1; }

wheels=()
while read -r found; do
  (($(stat -c %s "$found") <= FOLDER_BYTES)) || { echo "$found is bigger than a folder" >&2; exit 1; }
  wheels+=("$found")
done < <(cached_wheels "${DEPS[@]}")
((${#wheels[@]} == ${#DEPS[@]})) || exit 1

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pieces=$stage/pieces
mkdir -p "$pieces"
cp "${wheels[@]}" "$pieces/"
names=()
for f in "${wheels[@]}"; do names+=("$(basename "$f")"); done

{
  echo '#!/usr/bin/env bash'
  echo '# AIPerf against a server on the GPU machine (issue #28), from the repository root, once every'
  echo "# $PREFIX* folder is in ~/aiperf-carry. Written by scripts/prepare-gpu-aiperf-carry.sh: edit it there."
  echo '#   bash ~/aiperf-carry/run.sh --url URL --model NAME [other benchmarks.aiperf_run options]'
  echo '#   bash ~/aiperf-carry/run.sh --checkpoint DIR --engine te ... [options]: our server and gateway, started'
  echo '#     by benchmarks.aiperf_run (.gpu-serving carried beside, ~/vllm-carry/run.sh run before: its'
  echo "#     ~/vllm-site has the gateway's fastapi and uvicorn)"
  echo '# Environment: OUT (required: results go there), PYTHON (python3), WORK (/tmp/gemma-serving),'
  echo '# AIPERF_SITE (~/aiperf-site), AIPERF_CARRY (~/aiperf-carry), TOKENIZER (a directory with'
  echo '# tokenizer.json, if none of those below is there), LIMIT (540 s; then it is interrupted).'
  echo '# Leaves under $OUT: aiperf.md (the table), aiperf.json (its rows and checks), aiperf.log (what it'
  echo "# printed) and aiperf_exports.tar.gz (AIPerf's summary and per-request exports of each run)."
  printf 'wheels=(%s)\n' "${names[*]}"
  cat <<'RUN'
set -uo pipefail
py=${PYTHON:-python3}
carry=${AIPERF_CARRY:-$HOME/aiperf-carry}
site=${AIPERF_SITE:-$HOME/aiperf-site}
work=${WORK:-/tmp/gemma-serving}
out=${OUT:?set OUT to the results directory}
[[ -f benchmarks/aiperf_run.py ]] || { echo "run from the repository root" >&2; exit 1; }
mkdir -p "$out" "$work"
source scripts/triton_stub_env.sh || exit 1
aiperf_py=$py
if [[ " $* " == *" --url "* ]]; then
  # Not the numpy 1.26 .pth a killed Triton run left: AIPerf needs the machine's numpy 2.
  drop_stale_stub_pth "$py" || exit 1
else
  # Our server, started here: Triton's stub needs numpy 1.26 (scripts/triton_stub_env.sh's .pth), AIPerf
  # numpy 2 (the .pth steps aside where GEMMA_MACHINE_NUMPY is set: only AIPerf's processes get it).
  [[ -f .gpu-serving/tokenizer.json.gz ]] || { echo "our server needs .gpu-serving carried beside" >&2; exit 1; }
  [[ -d ${VLLM_SITE:-$HOME/vllm-site} ]] || { echo "the gateway needs ~/vllm-site: run ~/vllm-carry/run.sh first" >&2; exit 1; }
  triton_stub_env "$py" .gpu-serving "$work" '~/aiperf-carry/run.sh' || exit 1
  export PYTHONPATH=${VLLM_SITE:-$HOME/vllm-site}${PYTHONPATH:+:$PYTHONPATH}
  aiperf_py=$work/python3-machine-numpy
  printf '#!/bin/sh\nGEMMA_MACHINE_NUMPY=1 exec %s "$@"\n' "$(command -v "$py")" > "$aiperf_py" && chmod +x "$aiperf_py"
fi

# Install once per set of wheels: a second run on the same machine goes straight to AIPerf.
stamp=$site/.installed-$(echo "${wheels[*]}" | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
  missing=()
  for f in "${wheels[@]}"; do [[ -f $carry/$f ]] || missing+=("$f"); done
  if ((${#missing[@]})); then
    echo "not in $carry: ${missing[*]}; every .gpu-aiperfN call must run first, on this machine" >&2
    exit 2
  fi
  rm -rf "$site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]/#/$carry/}" || exit 2
  touch "$stamp"
  # AIPerf pins some of what it takes from the machine (rich~=14.1.0, aiohttp>=3.14.3, psutil~=7.0.0...):
  # say where the machine's version differs (a note, not a stop: --no-deps installs regardless).
  PYTHONPATH=$site "$py" -m pip check 2>/dev/null | grep -E '^aiperf .* has requirement' | sed 's/^/note: /' >&2
fi
# The carried wheels first, the machine's packages (numpy, transformers, aiohttp...) after them. No
# HF_HUB_OFFLINE: AIPerf 0.13.0 then looks a tokenizer up in the hub's cache only, a directory too
# (HFValidationError); a directory is loaded without the network anyway.
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} AIPERF_PYTHON=$aiperf_py
"$aiperf_py" -c 'from importlib.metadata import version
from aiperf.cli import app
import aiperf
print("aiperf", version("aiperf"), "at", aiperf.__file__)' >&2 || exit 3

# The tokenizer: one .gpu-serving/run.sh or ~/vllm-carry/run.sh unpacked, else one of their archives.
tok=${TOKENIZER:-$work/tokenizer}
if [[ ! -f $tok/tokenizer.json ]]; then
  for archive in "$HOME/vllm-carry/tokenizer.json.gz" .gpu-serving/tokenizer.json.gz ""; do
    [[ -z $archive || -f $archive ]] && break
  done
  [[ -n $archive ]] || { echo "no tokenizer: none in $tok, ~/vllm-carry or .gpu-serving; set TOKENIZER" >&2; exit 1; }
  echo "tokenizer from $archive" >&2
  mkdir -p "$tok" && gunzip -c "$archive" > "$tok/tokenizer.json" \
    && cp "$(dirname "$archive")/tokenizer_config.json" "$tok/" || exit 1
fi
rm -rf "$work/aiperf" "$work/aiperf-keep"
timeout -s INT -k 30 "${LIMIT:-540}" "$py" -m benchmarks.aiperf_run --tokenizer "$tok" --out "$work/aiperf" \
  --keep "$work/aiperf-keep" "$@" 2> >(tee "$out/aiperf.log" >&2) | tee "$out/aiperf.md"
rc=${PIPESTATUS[0]}
cp "$work/aiperf/aiperf.json" "$out/" 2>/dev/null
[[ -d $work/aiperf-keep ]] && tar czf "$out/aiperf_exports.tar.gz" -C "$work" aiperf-keep
exit "$rc"
RUN
} > "$pieces/run.sh"

echo "AIPerf 0.13.0 and ${#DEPS[@]} wheels: $(du -cb "${wheels[@]}" | tail -1 | cut -f1) bytes"
python3 "$(dirname "${BASH_SOURCE[0]}")/carry_folders.py" "$pieces" "$PREFIX" "$FOLDER_BYTES" '~/aiperf-carry' '--url URL --model NAME'
echo "The last call needs a server running (pass its --url and --model). Again on the same machine, nothing"
echo "carried (AIPerf stays installed in ~/aiperf-site): bash ~/aiperf-carry/run.sh ..."
