# Sourced by scripts/prepare-gpu-*-carry.sh: the GPU machine's wheels (CPython 3.12, manylinux x86_64),
# downloaded once into $CACHE, one file per pinned requirement.
#   source "$(dirname "${BASH_SOURCE[0]}")/carry_wheels.sh"; CACHE=...; cached_wheels NAME==VERSION ...
# prints each requirement's wheel, one per line, downloading those not cached yet; exits if one is not
# exactly one file.
PLATFORMS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_31_x86_64
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

# NAME==VERSION -> NAME-VERSION-*.whl in $CACHE (wheel names use underscores).
cached() {
  local name=${1%%==*} version=${1#*==}
  find "$CACHE" -maxdepth 1 -iname "${name//-/_}-${version}-*.whl" | sort
}

cached_wheels() {
  local spec found missing=()
  mkdir -p "$CACHE"
  for spec in "$@"; do [[ -n $(cached "$spec") ]] || missing+=("$spec"); done
  if ((${#missing[@]})); then
    python3 -m pip download -q --no-deps "${PLATFORMS[@]}" -d "$CACHE" "${missing[@]}" >&2 || exit 1
  fi
  for spec in "$@"; do
    found=$(cached "$spec")
    [[ $(wc -l <<<"$found") == 1 && -n $found ]] || { echo "$spec: want one wheel in $CACHE, found: ${found:-none}" >&2; exit 1; }
    echo "$found"
  done
}
