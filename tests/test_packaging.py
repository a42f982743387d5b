"""Packaging: the wheel carries properties/*.yaml, and an installed wheel runs with the plugin's
defaults from any directory (leave-one-out, full ranking, Hit/NDCG@10), not RecBole's.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy
of the source tree, so no ``build/`` folder is left in (or reused from) the checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "saved", "log", "log_tensorboard", "ray_results", "dataset", "results",
                                ".venv", "venv", "tests", "benchmarks")


def _pip(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src),
         cwd=tmp)
    wheels = list((tmp / "dist").glob("recbole_iisan-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """``pip install --no-deps --target`` of the wheel: a folder to put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=target)
    return target


def _env(pythonpath: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RECBOLE_IISAN_DATA_URL", None)
    return env


def test_wheel_holds_every_properties_yaml_and_the_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = sorted(p.relative_to(REPO / "properties").as_posix()
                   for p in (REPO / "properties").rglob("*.yaml"))
    assert "overall.yaml" in yamls and any("/" in y for y in yamls)  # per-dataset subfolders too
    missing = [y for y in yamls if f"recbole_iisan/properties/{y}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "recbole-iisan = recbole_iisan.quick_start.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Requires-Dist: requests" in metadata and "Requires-Dist: gdown" in metadata


def test_installed_wheel_runs_sasrec_with_the_plugin_protocol_from_anywhere(installed, tmp_path):
    env = _env(installed)
    where = subprocess.run(  # (cheap: finds the package without importing RecBole)
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('recbole_iisan').origin)"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(installed)  # the installed copy, not the checkout
    assert (installed / "recbole_iisan" / "properties" / "overall.yaml").is_file()

    script = installed / "bin" / "recbole-iisan"
    assert script.is_file()
    result_file = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--model=SASRec", "--dataset=ml-100k", "--epochs=1",
         "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
         "--train_batch_size=2048", "--user_inter_num_interval='[0,40]'",  # 306 users: fast
         f"--result_file={result_file}",
         f"--checkpoint_dir={tmp_path / 'saved'}"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["model"] == "SASRec" and result["epochs_run"] == 1
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}  # RecBole's default: 5 metrics
    assert result["valid_metric"] == "NDCG@10"
    logs = list((tmp_path / "log").rglob("*.log"))
    assert logs, "RecBole wrote no log in the working directory"
    log = logs[0].read_text()
    # leave-one-out split ordered by time, full ranking: properties/overall.yaml, not RecBole's RS
    assert "'split': {'LS': 'valid_and_test'}" in log and "'order': 'TO'" in log
    assert "'mode': {'valid': 'full', 'test': 'full'}" in log
    assert "The number of users: 306" in log  # ml-100k, RecBole's bundled copy, read from anywhere


def test_an_installed_package_without_its_properties_fails_in_one_line(installed, tmp_path):
    broken = tmp_path / "site"
    shutil.copytree(installed / "recbole_iisan", broken / "recbole_iisan",
                    ignore=shutil.ignore_patterns("properties", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from recbole_iisan.quick_start.cli import main; sys.exit(main())",
         "--model=SASRec", "--dataset=ml-100k", "--epochs=1"],
        cwd=tmp_path, env=_env(broken), text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: the plugin's defaults are missing: no properties/overall.yaml in")
    assert len([l for l in err if l.startswith("error:")]) == 1 and "Traceback" not in proc.stderr
