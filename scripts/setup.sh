#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repo, installs the pinned stack and builds zsqfast.
#   ZSQFAST_VENV   where the venv lives (default: <repo>/.venv)
#   ZSQFAST_FRESH=1  recreate it from scratch (CI does)
#   ZSQFAST_CUDA=auto|0|1 and ZSQFAST_SKIP_BUILD=1 are passed on to setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZSQFAST_VENV:-$PWD/.venv}
PY=${PYTHON:-python3}
if [ "${ZSQFAST_FRESH:-0}" = "1" ] || [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --clear "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_q() { pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
python -c "import torch, torchvision" 2>/dev/null || pip_q torch==2.14.1 torchvision==0.29.1
pip_q timm numpy pytest pybind11 ninja scikit-learn safetensors
# test-only: the pytorch-grad-cam package that gradcam(mode="standard") is checked against
pip_q grad-cam
python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-2}
pip install --no-build-isolation --disable-pip-version-check -e . 2>&1 | tail -n 3
python -c "import torch, zsqfast; print('zsqfast', zsqfast.__version__, '| CPU backends:', zsqfast.available_backends('cpu'), '| ISA:', zsqfast.cpu_isa())"
