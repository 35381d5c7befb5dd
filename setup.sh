#!/usr/bin/env bash
# One-time setup on a fresh Linux machine: a virtual environment in .venv with everything installed.
# CPU machines get the CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build).
# As root with apt-get, it also installs Debian's Chromium for the browser tests and the visual score.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q torch==2.13.0 || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -q -e ".[dev,browser]"  # the package with its dependencies, as Colab's %pip install git+... gets them
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "setup done: $(python -c 'import htmlgen_utils, torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)')"
