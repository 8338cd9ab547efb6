#!/usr/bin/env bash
# Create .venv in the repo root with everything the server, the tests and the benchmarks need.
# torch goes first and pinned: on these machines torch==2.13.0 is a local CPU build, while an
# unpinned torch would pull a multi-GB CUDA build. Re-running is cheap (a stamp file skips pip).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.setup-stamp"
want=$(cat "$root/pyproject.toml" "$root/client/pyproject.toml" "$root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi

python=${PYTHON:-python3}
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e "$root[default-model,triton,test]" -e "$root/client"
echo "$want" >"$stamp"
