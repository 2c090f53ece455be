#!/usr/bin/env bash
# The internet-off route with the real wheel set, on this machine: a fresh virtual environment over this Python's
# packages (torch stays), an older transformers, huggingface_hub and peft in it as on Kaggle, pip pointed at nothing,
# and the wheels folder attached the way Kaggle attaches a dataset. The setup cell's install_packages must bring every
# bound in helpers.HOSTED_PACKAGES within reach from the folder alone.
#   bash kaggle/build_wheels.sh /tmp/wheels 3.11 && bash kaggle/check_offline_install.sh /tmp/wheels
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=$(realpath "$1")
WORK=$(mktemp -d)
python3 -m venv --system-site-packages --without-pip "$WORK/venv"
PY="$WORK/venv/bin/python"
# Kaggle's older packages, installed while the network is still there.
"$PY" -m pip install --quiet --no-deps "transformers==4.57.1" "huggingface_hub==0.36.0" "peft==0.17.1"
mkdir -p "$WORK/input/kaggle-wheels" && ln -s "$WHEELS" "$WORK/input/kaggle-wheels/wheels"

# The network cut: no pip configuration, an index on a port where nothing listens.
export PIP_CONFIG_FILE=/dev/null PIP_INDEX_URL=http://127.0.0.1:9/simple
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL
cd "$WORK" && "$PY" - "$REPO" "$WORK/input" <<'PY'
import sys

sys.path.insert(0, sys.argv[1])
import helpers

print("before:", ", ".join(helpers.outdated_packages()) or "all met")
print(helpers.install_packages(wheel_roots=(sys.argv[2],)))
print("after:", ", ".join(helpers.outdated_packages()) or "all met")
PY
"$PY" -c "import transformers, huggingface_hub, peft; print('imports:', transformers.__version__, huggingface_hub.__version__, peft.__version__)"
rm -rf "$WORK"
