#!/usr/bin/env bash
# Prepares, on this machine, what bench/gpu_check.sh needs on a lent GPU machine, which has its own torch and
# no package registry: Fashion-MNIST and wheels of the test extras its image lacks, in runs/gpu-carry (ignored,
# about 30 MB; a `run` call carries up to 64 MiB). Needs `make test`'s .venv, the registry and Debian's
# dataset-fashion-mnist here.
set -euo pipefail
carry=runs/gpu-carry
python=${PYTHON:-.venv/bin/python}
rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/fashion-mnist"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$carry/fashion-mnist/"
# Pure-Python packages (fvcore's FLOPs cross-check, torch-pruning's baselines); the image has the rest (timm,
# transformers, onnxruntime, pytest-xdist, portalocker, tabulate, pyyaml). Versions: those installed here.
missing=$("$python" -m pip freeze | grep -iE '^(fvcore|iopath|yacs|termcolor|torch-pruning)==' || true)
[ "$(echo "$missing" | wc -l)" = 5 ] || { echo "run make test first: $python lacks a test extra"; exit 1; }
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$carry/wheels" $missing
du -sh "$carry"
