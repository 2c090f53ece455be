#!/usr/bin/env bash
# The wheels for Kaggle with Internet off: the packages the setup cell installs (helpers.HOSTED_PACKAGES) and all they
# depend on, for Kaggle's Python and platform, except torch and its CUDA libraries, which Kaggle's GPU image has.
# Upload the folder as a Kaggle dataset and attach it: the setup cell finds it and installs from it (pip --no-index).
#   bash kaggle/build_wheels.sh [out_dir=kaggle-wheels] [python_version=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-kaggle-wheels}
PYTHON_VERSION=${2:-3.12}

# Kaggle's image: CPython on x86_64 Linux with glibc 2.35. pip takes manylinux tags literally, so list them all.
TARGET=(--only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION")
for glibc in $(seq 35 -1 5); do TARGET+=(--platform "manylinux_2_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

mkdir -p "$OUT"
REQUIREMENTS=$(python3 -c "import helpers; print(' '.join(helpers.HOSTED_PACKAGES))")
# Resolve for that target without installing anything (pip reads each wheel's metadata, not the wheel)...
python3 -m pip install --dry-run --ignore-installed --quiet --report "$OUT/resolved.json" --target "$OUT/unused" \
  "${TARGET[@]}" $REQUIREMENTS
# ...and download what it chose, less torch and its CUDA stack (3 GB, and Kaggle's own build must stay).
PINS=$(python3 - "$OUT/resolved.json" <<'PY'
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not re.match(r"(torch|triton|nvidia-|cuda-)", name.lower()):
        print(f"{name}=={version}")
PY
)
python3 -m pip download --quiet --no-deps --dest "$OUT" "${TARGET[@]}" $PINS
rm -rf "$OUT/unused" "$OUT/resolved.json"
echo "$(ls "$OUT"/*.whl | wc -l) wheels in $OUT, $(du -sh "$OUT" | cut -f1) (Python $PYTHON_VERSION, manylinux x86_64):"
ls "$OUT"
