#!/usr/bin/env bash
# Prepares vLLM for the GPU machine (issue #17: vLLM side by side with our engine, same checkpoint,
# same load), which has no network and may carry at most 64 MiB per call, the repository included.
# Run from the repo root, after `make setup`; downloads are cached in ~/.cache/vllm-carry.
#   bash scripts/prepare-gpu-vllm-carry.sh              # writes .gpu-vllm0 .. .gpu-vllmN, prints the calls
#   bash scripts/prepare-gpu-vllm-carry.sh --list-deps  # the carried requirements, one per line
#
# What travels (docs/benchmarks.md "vLLM side by side" says why each is in or out):
# - vLLM 0.26.0's wheel (its last release on torch==2.11.0, the machine's torch) without the files in
#   DROP below (a wheel bigger than a call's room travels in parts: `cat` joins them there, run.sh
#   checks the sha256);
# - DEPS: what `vllm.LLM`, vLLM's AsyncLLM and its Python OpenAI server import for a dense bf16 Gemma
#   and the machine lacks;
# - the packaged Gemma 3 270M's tokenizer (for the checkpoint, if .gpu-serving/run.sh has not made it);
# - run.sh: installs all of it with pip into ~/vllm-site (on PYTHONPATH of the vLLM benchmark alone,
#   so the server's environment is untouched) and runs benchmarks/vllm_baseline.py, or with `serve`
#   first starts vLLM's OpenAI server for AIPerf (issue #28) and leaves it running.
# Environment: VLLM_CARRY_CACHE, VLLM_CARRY_FOLDER_BYTES (58000000), VLLM_CARRY_TOKENIZER (a directory
# with tokenizer.json and tokenizer_config.json; default: the packaged model's), VLLM_CARRY_DROP (below).
set -euo pipefail
VLLM_VERSION=0.26.0
PREFIX=.gpu-vllm
CACHE=${VLLM_CARRY_CACHE:-$HOME/.cache/vllm-carry}
FOLDER_BYTES=${VLLM_CARRY_FOLDER_BYTES:-58000000}  # at most, per folder: < 56 MiB leaves a call's 64 MiB room for the repo

# Found by importing vLLM's LLM, AsyncLLM, EngineCore, GPU worker, both model runners, FlashAttention
# backend, sampler and Gemma model, and vllm.entrypoints.openai.api_server and cli.serve (their FastAPI app
# built) against the machine's package list (KINDS.md); versions are the
# newest within vLLM's pins that resolve together with torch 2.11.0 and transformers 5.17.0.
DEPS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic needs >= 4.14.1; this one shadows the machine's for vLLM only
  fastapi==0.136.3 starlette==1.10.0  # vllm.entrypoints.serve, imported by the LLM class's modules
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7  # tool and reasoning parsers, imported eagerly
  xgrammar==0.2.7 apache-tvm-ffi==0.1.10 llguidance==1.7.6  # structured output: annotations evaluated at import
  pyzmq==27.3.0 msgspec==0.22.0 cbor2==6.3.0 cachetools==8.0.2 pybase64==1.5.1  # engine IPC, hashing, caches
  depyf==0.20.0 astor==0.8.1 dill==0.4.1  # imported by vLLM's torch.compile wrapper on some paths
  # vLLM's `ngram` speculative method (issue #27). vLLM pins numba 0.65.0, which needs numpy < 2.5; the
  # machine has 2.5.2, which 0.68.1 allows. llvmlite (60 MB) travels in parts.
  numba==0.68.1 llvmlite==0.50.0
  # vLLM's Python OpenAI server (`python -m vllm.entrypoints.openai.api_server`, issue #28's AIPerf runs):
  # uvicorn (plain: the machine's h11 and uvloop serve), watchfiles (TLS reload, imported at start),
  # the /metrics instrumentator, SageMaker's routes (jmespath; their supervisor is never imported).
  uvicorn==0.55.0 watchfiles==1.3.0 prometheus-fastapi-instrumentator==8.1.0
  model-hosting-container-standards==0.1.16 jmespath==1.1.0
)
# Files of the wheel a dense bf16 model on Hopper never loads: without them it takes 3 calls, not 6.
# VLLM_CARRY_DROP (space-separated) replaces the list; VLLM_CARRY_DROP= carries the whole wheel.
DROP=(
  vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so  # 129 MB packed: FlashAttention 2; on Hopper vLLM runs FA3
  vllm/_moe_C_stable_libtorch.abi3.so       # 41 MB: MoE kernels, imported under contextlib.suppress
  vllm/vllm-rs                              # 16 MB: `vllm serve`'s Rust frontend, only with VLLM_USE_RUST_FRONTEND=1
)
if [[ -v VLLM_CARRY_DROP ]]; then read -ra DROP <<<"$VLLM_CARRY_DROP"; fi
source "$(dirname "${BASH_SOURCE[0]}")/carry_wheels.sh"

if [[ ${1:-} == --list-deps ]]; then printf '%s\n' "${DEPS[@]}"; exit 0; fi
[[ -f pyproject.toml && -d benchmarks ]] || { echo "run from the repository root" >&2; exit 1; }
((FOLDER_BYTES < 56 << 20)) || { echo "VLLM_CARRY_FOLDER_BYTES must stay under 56 MiB" >&2; exit 1; }

files=()
while read -r f; do files+=("$f"); done < <(cached_wheels "vllm==$VLLM_VERSION" "${DEPS[@]}")
((${#files[@]} == ${#DEPS[@]} + 1)) || exit 1
full_wheel=${files[0]} dep_wheels=("${files[@]:1}")

tokenizer=${VLLM_CARRY_TOKENIZER:-$(.venv/bin/python -m backend.default_model)}  # converts the packaged model once
for name in tokenizer.json tokenizer_config.json; do
  [[ -f $tokenizer/$name ]] || { echo "no $name in $tokenizer" >&2; exit 1; }
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
wheel=$(basename "$full_wheel")
# The wheel without DROP, its RECORD without their lines (pip installs what the archive holds).
python3 - "$full_wheel" "$stage/$wheel" "${DROP[@]}" <<'PY'
import sys, zipfile
src, dst, drop = sys.argv[1], sys.argv[2], set(sys.argv[3:])
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    absent = drop - set(zin.namelist())
    if absent:
        sys.exit(f"not in {src}: {sorted(absent)} (a new vLLM version? check DROP)")
    for info in zin.infolist():
        if info.filename in drop:
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if line.split(b",")[0].decode() not in drop)
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
PY
wheel_sha256=$(sha256sum "$stage/$wheel" | cut -d' ' -f1)

# What travels, in $pieces: every wheel, a wheel bigger than a folder (vLLM's, llvmlite's) as parts of
# one folder's size that run.sh joins again (`joined`: file:sha256:parts), the tokenizer and run.sh.
pieces=$stage/pieces
mkdir -p "$pieces"
deps=() joined=()
for f in "$stage/$wheel" "${dep_wheels[@]}"; do
  name=$(basename "$f")
  [[ $f == "$stage/$wheel" ]] || deps+=("$name")
  if (($(stat -c %s "$f") > FOLDER_BYTES)); then
    split -b "$FOLDER_BYTES" -d -a 2 "$f" "$pieces/$name.part"
    joined+=("$name:$(sha256sum "$f" | cut -d' ' -f1):$(ls "$pieces/$name".part* | wc -l)")
  else
    cp "$f" "$pieces/"
  fi
done
cp "$tokenizer/tokenizer_config.json" "$pieces/"
gzip -9 -c "$tokenizer/tokenizer.json" > "$pieces/tokenizer.json.gz"

{
  echo '#!/usr/bin/env bash'
  echo '# vLLM side by side (issue #17), on the GPU machine from the repository root, once every'
  echo "# $PREFIX* folder is in ~/vllm-carry. Written by scripts/prepare-gpu-vllm-carry.sh: edit it there."
  echo '#   bash ~/vllm-carry/run.sh [benchmarks.vllm_baseline options: they win over the ones below]'
  echo '#   bash ~/vllm-carry/run.sh serve [vllm serve options: they win over the ones below]'
  echo '# Environment: OUT (required: results go there), PYTHON (python3), WORK (/tmp/gemma-serving: the'
  echo '# checkpoint and tokenizer .gpu-serving/run.sh makes; made here if missing), VLLM_SITE (~/vllm-site),'
  echo '# VLLM_CARRY (~/vllm-carry), LIMIT (500 s for the benchmark; then it is interrupted; for serve: how'
  echo '# long to wait for /health, 300 s), VLLM_PORT (serve: 8000; not --port, the wait asks this one).'
  echo '# Leaves under $OUT: vllm.jsonl (JSON lines), vllm.md (the table) and vllm.log (everything it printed);'
  echo '# with serve, vllm_serve.pid and vllm_serve.log up to /health, the server still running; a later call'
  echo '# finds both in $WORK (AIPerf: ~/aiperf-carry/run.sh --url http://127.0.0.1:8000 --model gemma; then'
  echo '# kill "$(cat /tmp/gemma-serving/vllm_serve.pid)"; cp /tmp/gemma-serving/vllm_serve.log $OUT/).'
  printf 'wheel=%q\n' "$wheel"
  printf 'deps=(%s)\n' "${deps[*]}"
  printf 'joined=(%s)  # FILE:SHA256:PARTS, each joined from FILE.part00 ...\n' "${joined[*]}"
  printf '# left out of the wheel (scripts/prepare-gpu-vllm-carry.sh says why): %s\n' "${DROP[*]}"
  cat <<'RUN'
set -uo pipefail
py=${PYTHON:-python3}
carry=${VLLM_CARRY:-$HOME/vllm-carry}
site=${VLLM_SITE:-$HOME/vllm-site}
work=${WORK:-/tmp/gemma-serving}
out=${OUT:?set OUT to the results directory}
[[ -f benchmarks/vllm_baseline.py ]] || { echo "run from the repository root" >&2; exit 1; }
mkdir -p "$out" "$work"
# Not the numpy 1.26 .pth a killed Triton run left (scripts/triton_stub_env.sh): vLLM needs numpy 2.
source scripts/triton_stub_env.sh && drop_stale_stub_pth "$py" || exit 1

# Install once per set of wheels: a second run on the same machine goes straight to the benchmark.
stamp=$site/.installed-$(echo "${joined[*]} ${deps[*]}" | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
  expected=(tokenizer.json.gz tokenizer_config.json)
  for entry in "${joined[@]}"; do
    IFS=: read -r name sha n <<<"$entry"
    for ((i = 0; i < n; i++)); do expected+=("$(printf '%s.part%02d' "$name" "$i")"); done
  done
  for f in "${deps[@]}"; do [[ " ${joined[*]} " == *" $f:"* ]] || expected+=("$f"); done
  missing=()
  for f in "${expected[@]}"; do [[ -f $carry/$f ]] || missing+=("$f"); done
  if ((${#missing[@]})); then
    echo "not in $carry: ${missing[*]}; every .gpu-vllmN call must run first, on this machine" >&2
    exit 2
  fi
  for entry in "${joined[@]}"; do
    IFS=: read -r name sha n <<<"$entry"
    (cd "$carry" && cat "$name".part* > "$name" && echo "$sha  $name" | sha256sum -c --quiet -) || exit 2
  done
  rm -rf "$site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$carry/$wheel" "${deps[@]/#/$carry/}" || exit 2
  touch "$stamp"
fi
export PYTHONPATH=$site
# vLLM, its kernels and its FlashAttention load, or nothing else can run: on CUDA, vLLM's attention
# layers import vllm.vllm_flash_attn whatever the backend, and it needs FA2 or FA3.
"$py" -c 'import vllm, vllm._C_stable_libtorch
print("vllm", vllm.__version__, "at", vllm.__file__)
try:
    from vllm.vllm_flash_attn import flash_attn_interface as fa
except ImportError as e:
    raise SystemExit(f"vllm.vllm_flash_attn does not import: {e}. If FA2 would: VLLM_CARRY_DROP= "
                     "bash scripts/prepare-gpu-vllm-carry.sh carries the whole wheel")
print("FlashAttention 3 loads:", fa.FA3_AVAILABLE, fa.FA3_UNAVAILABLE_REASON or "")' || exit 3

tok=$work/tokenizer
if [[ ! -f $tok/tokenizer.json ]]; then
  mkdir -p "$tok" && gunzip -c "$carry/tokenizer.json.gz" > "$tok/tokenizer.json" \
    && cp "$carry/tokenizer_config.json" "$tok/" || exit 1
fi
ckpt=$work/gemma-2b-random
if [[ ${1:-} == serve ]]; then
  shift
  # vLLM's Python OpenAI server (no VLLM_USE_RUST_FRONTEND: vllm-rs is not carried) on the benchmark's
  # checkpoint with benchmarks/vllm_baseline.py's engine arguments and environment, for AIPerf (issue #28).
  port=${VLLM_PORT:-8000}
  url=http://127.0.0.1:$port
  health() { "$py" -c 'import sys, urllib.request as u
u.build_opener(u.ProxyHandler({})).open(sys.argv[1] + "/health", timeout=2)' "$url" >/dev/null 2>&1; }
  if health; then echo "something already answers $url/health; stop it first" >&2; exit 4; fi
  if [[ ! -f $ckpt/config.json ]]; then  # made as benchmarks/vllm_baseline.py makes it: the machine's packages
    env -u PYTHONPATH "$py" -m benchmarks.random_checkpoint --out "$ckpt" --tokenizer "$tok" --layers 18 || exit 1
  fi
  log=$work/vllm_serve.log  # where a later call finds it; $out gets a copy of it as it stands when this call ends
  detach=(); command -v setsid >/dev/null && detach=(setsid)  # its own session: it outlives this call
  VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
    "${detach[@]}" nohup "$py" -m vllm.entrypoints.openai.api_server --model "$ckpt" --tokenizer "$ckpt" \
    --tokenizer-mode hf --served-model-name gemma --host 127.0.0.1 --port "$port" --dtype bfloat16 \
    --max-model-len 1024 --max-num-seqs 64 --gpu-memory-utilization 0.5 --seed 0 --disable-log-stats \
    --attention-backend FLASH_ATTN "$@" >"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$out/vllm_serve.pid" && echo "$pid" >"$work/vllm_serve.pid"
  limit=${LIMIT:-300} start=$SECONDS
  until health; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cp "$log" "$out/" && tail -n 40 "$log" >&2; echo "vLLM's server (pid $pid) ended before $url/health answered" >&2
      exit 4
    fi
    if ((SECONDS - start >= limit)); then
      kill "$pid"; cp "$log" "$out/" && tail -n 40 "$log" >&2
      echo "no answer from $url/health in $limit s; stopped pid $pid" >&2; exit 4
    fi
    sleep 1
  done
  cp "$log" "$out/"
  echo "vLLM serves gemma at $url after $((SECONDS - start)) s: pid $pid, log $log"
  echo "stop it with: kill \"\$(cat $work/vllm_serve.pid)\""
  exit 0
fi
# --ours: our numbers from the same machine, when there (.gpu-serving/run.sh keeps its results in $WORK).
timeout -s INT -k 30 "${LIMIT:-500}" "$py" -m benchmarks.vllm_baseline --checkpoint "$ckpt" \
  --tokenizer "$tok" --out "$out/vllm.jsonl" --ours "$work/results/bench.jsonl" "$work/gpu_bench.jsonl" \
  "$@" 2>&1 | tee "$out/vllm.log"
exit "${PIPESTATUS[0]}"
RUN
} > "$pieces/run.sh"

echo "vLLM $VLLM_VERSION wheel without ${DROP[*]}: $(stat -c %s "$stage/$wheel") bytes, sha256 $wheel_sha256"
python3 "$(dirname "${BASH_SOURCE[0]}")/carry_folders.py" "$pieces" "$PREFIX" "$FOLDER_BYTES" '~/vllm-carry'
echo "Again on the same machine, nothing carried (vLLM stays installed in ~/vllm-site): bash ~/vllm-carry/run.sh"
echo "vLLM's OpenAI server for AIPerf (issue #28), left running on port 8000: bash ~/vllm-carry/run.sh serve"
