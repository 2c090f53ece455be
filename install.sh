#!/usr/bin/env bash
# Install what the notebook and the tests need. Safe to run again: pip skips what is already there.
#   bash install.sh          into the current Python
#   bash install.sh .venv    into a virtual environment (created if missing)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=python3
if [ $# -ge 1 ]; then
  [ -x "$1/bin/python" ] || python3 -m venv "$1"
  PYTHON="$1/bin/python"
fi

# torchvision must match torch exactly. Keep a working pair (Kaggle, Colab); otherwise install a known one.
if ! "$PYTHON" -c "import torch, torchvision.ops" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.14.1" "torchvision==0.29.1"
fi
"$PYTHON" -m pip install -r requirements.txt
"$PYTHON" -c "import torch, transformers, peft; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
