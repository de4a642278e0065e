#!/usr/bin/env bash
# Prepares, on this machine, what bench/gpu_check.sh needs on a lent GPU machine, which has its own torch and
# no package registry: Fashion-MNIST and wheels of the test extras its image lacks, in runs/gpu-carry (ignored,
# about 32 MB; a `run` call carries up to 64 MiB). Needs the registry here and Debian's dataset-fashion-mnist.
set -euo pipefail
carry=runs/gpu-carry
python=${PYTHON:-.venv/bin/python}
rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/fashion-mnist"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$carry/fashion-mnist/"
# Pure-Python packages (fvcore's FLOPs cross-check, torch-pruning's baselines); the image has the rest (timm,
# transformers, onnxruntime, pytest-xdist, portalocker, tabulate, pyyaml). Versions: those pyproject.toml installs here.
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$carry/wheels" \
    fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0 torch-pruning==1.6.1
du -sh "$carry"
