#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.py needs and the GPU machine's image lacks (its image
# has Python 3.12, torch, triton, torchvision, numpy, scipy, scikit-learn, matplotlib, tensorboard, torchmetrics,
# pyyaml, tqdm, pillow, requests, protobuf, click, xxhash, huggingface-hub, safetensors; not Avalanche, nor the
# modules Avalanche imports eagerly: wandb, pytorchcv, gdown, qpsolvers, GPUtil, dill). timm is carried at the
# version the tests here run with. Pure-Python wheels except pydantic-core (cp312, manylinux x86-64).
# .whl/ is ignored through .git/info/exclude, never committed; the device command (top of benchmarks/RESULTS.md)
# carries it and installs it into /tmp/site with pip --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .whl
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

WHEELS=(
  avalanche-lib==0.6.0 pytorchcv==0.0.74 qpsolvers==4.13.0 dill==0.4.1
  gdown==6.5.1 beautifulsoup4==4.15.0 soupsieve==4.1.3
  wandb==0.31.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  platformdirs==4.14.9 opentelemetry-api==1.45.2
  timm==1.0.31 mambapy==1.2.0
)
SDIST_ONLY=(gputil==1.4.0)  # no wheel on PyPI: built here (pure Python, py3-none-any)

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
python3 -m pip wheel --quiet --no-deps -w .whl "${SDIST_ONLY[@]}"
ls -l .whl
du -sh .whl
