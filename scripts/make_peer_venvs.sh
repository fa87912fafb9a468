#!/usr/bin/env bash
# Create the Python environments of `sdrt bench`'s Optimum peers, each apart from sdrt's own .venv (their
# transformers/optimum pins clash with sdrt's and with each other), torch pinned by constraints.txt:
#   DIR/optimum-intel  Optimum-Intel's OpenVINO pipeline   (peers optimum-intel, optimum-intel-static)
#   DIR/optimum-onnx   Optimum's ONNX Runtime pipeline     (peer optimum-onnxruntime)
# The versions are the ones that work together with torch 2.13 CPU on the project's machines. The peers
# run sdrt's bench worker from this checkout (PYTHONPATH), so sdrt itself is not installed in them.
#
#   scripts/make_peer_venvs.sh [DIR]        # DIR defaults to .venvs/ in this checkout
#   sdrt bench OUT --peer-python optimum-intel=DIR/optimum-intel/bin/python \
#                  --peer-python optimum-onnxruntime=DIR/optimum-onnx/bin/python
#
# torch 2.13.0 must resolve to the CPU wheel, as for `make test`: where pip's indexes would give the CUDA
# build, run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. PY picks the Python (python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.venvs}
PY=${PY:-python3}

# make_venv NAME PACKAGE... : a fresh venv DIR/NAME with the packages, then check its torch is the pinned one
make_venv() {
    local venv=$DIR/$1
    shift
    echo "creating $venv"
    "$PY" -m venv --clear "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -c "$ROOT/constraints.txt" "$@"
    "$venv/bin/python" -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__'
}

make_venv optimum-intel torch numpy "optimum-intel[openvino]==2.2.0" "optimum==2.3.0" "openvino==2026.4.1" \
    "openvino-tokenizers==2026.4.1.0" "nncf==3.4.0" "diffusers==0.39.0" "transformers==5.5.4"
make_venv optimum-onnx torch numpy "optimum-onnx[onnxruntime]==0.1.0" "optimum==2.1.0" "onnxruntime==1.32.0" \
    "onnx==1.23.2" "diffusers==0.39.0" "transformers==4.57.6" "accelerate==1.15.0"

echo "sdrt bench OUT --peer-python optimum-intel=$DIR/optimum-intel/bin/python \\"
echo "               --peer-python optimum-onnxruntime=$DIR/optimum-onnx/bin/python"
