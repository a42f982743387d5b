"""recbole_iisan/utils/values.py (and its use in compat and the command line): config values given
as text are read as data, never evaluated. Benign values convert as RecBole's ``eval`` converts
them (RecBole's own method is the reference); a payload string runs nothing, on the command line,
in a ``config_dict``, in ``hyper.test`` and in a Ray Tune trial."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import recbole_iisan  # noqa: F401  (applies the compat shims)
from conftest import write_tiny_dataset, trials_table
from recbole_iisan.utils.values import literal_value

REPO = Path(__file__).resolve().parents[1]

BENIGN = ["5", "-3", "  7 ", "0", "2e-4", "1e-4", "0.5", "-1.5e3", "1_000", "0x10", "[10,20]", "[10, 20]",
          "[1, [2, 3]]", "{'RO':[0.8,0.1,0.1]}", "{'LS': 'valid_and_test'}", "{'a': {'b': None}}", "(1,2)",
          "True", "False", "true", "FALSE", "None", "'quoted'", '"double"', "Hit@10", "SASRec", "adam", "cpu",
          "[Hit,NDCG]", "inf", "-inf", "nan", "{1,2}", "1j", "b'x'", "saved/", "data/x", "a b", "", "even"]


def _payload(marker: Path) -> str:
    return f'__import__("os").system("touch {marker}")'


def _recbole_convert(text: str):
    """RecBole 1.2.1's own ``Config._convert_config_dict`` (with ``eval``) on one benign value."""
    from recbole.config import Config

    return Config._convert_config_dict.__wrapped__(None, {"v": text})["v"]


@pytest.mark.parametrize("text", BENIGN)
def test_benign_values_convert_as_recbole_converts_them(text):
    ours, theirs = literal_value(text), _recbole_convert(text)
    assert ours == theirs or (ours != ours and theirs != theirs)  # nan
    assert type(ours) is type(theirs)


@pytest.mark.parametrize("text, expected", [
    ("[text, text2]", ["text", "text2"]), ("{text_head: 1e-3}", {"text_head": 1e-3}), ("[10,20]", [10, 20]),
    ("{'RO':[0.8,0.1,0.1]}", {"RO": [0.8, 0.1, 0.1]}), ("2e-4", 2e-4), ("[Hit, NDCG]", ["Hit", "NDCG"])])
def test_command_line_values_read_as_recbole_reads_its_yaml(text, expected):
    """A flow list or mapping of bare words is read as RecBole's own yaml loader reads it."""
    from recbole.config import Config

    from recbole_iisan.config.configurator import parse_value

    assert parse_value(text) == expected
    if text.startswith(("[", "{")) and "'" not in text:
        assert parse_value(text) == yaml.load(text, Loader=Config._build_yaml_loader(None))


def test_arithmetic_is_not_evaluated():
    """The one difference with RecBole: an expression stays text (RecBole computed it)."""
    assert _recbole_convert("2**10") == 1024 and literal_value("2**10") == "2**10"
    assert literal_value("1+2") == "1+2"


def test_a_payload_in_config_dict_and_in_recboles_own_argv_is_a_plain_string(tiny_data, tmp_path, monkeypatch):
    """``Config(config_dict=...)`` (where a Ray trial's values arrive) and RecBole's own reading of
    ``sys.argv`` both go through ``_convert_config_dict``."""
    from recbole.config import Config

    marker = tmp_path / "pwned"
    monkeypatch.setattr(sys, "argv", ["x", f"--optimizer_note={_payload(marker)}"])
    config = Config(model="SASRec", dataset="tiny", config_dict={
        "data_path": str(tiny_data), "learner": _payload(marker), "train_neg_sample_args": None, "state": "error"})
    assert config["learner"] == _payload(marker) and config["optimizer_note"] == _payload(marker)
    assert not marker.exists()


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "run_recbole_iisan.py"), *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=timeout)


SASREC = ["--model=SASRec", "--dataset=tiny", "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
          "--train_batch_size=64", "--eval_batch_size=256", "--state=error"]


def test_a_payload_on_the_command_line_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    write_tiny_dataset(tmp_path / "data")
    # where a number is expected: refused in one line, before any data is read
    proc = _cli(*SASREC, f"--data_path={tmp_path / 'nodata'}", f"--epochs={_payload(marker)}", cwd=tmp_path)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'epochs'" in lines[0], proc.stderr
    # where text is accepted: taken as that text (RecBole warns that the optimizer is unknown, uses Adam)
    out = tmp_path / "r.json"
    proc = _cli(*SASREC, f"--data_path={tmp_path / 'data'}", f"--checkpoint_dir={tmp_path / 'saved'}", "--epochs=1",
                f"--learner={_payload(marker)}", f"--result_file={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    from safetensors import safe_open

    with safe_open(json.loads(out.read_text())["checkpoint"], "pt") as f:
        stored = json.loads(f.metadata()["state"])["config"]["values"]
    assert stored["learner"] == _payload(marker)


def test_a_payload_in_hyper_test_is_refused_or_a_string(tmp_path):
    from recbole_iisan.trainer.hyper_tuning import parse_hyper_line
    from recbole_iisan.utils.errors import PluginConfigError

    marker = tmp_path / "pwned"
    with pytest.raises(PluginConfigError, match="'choice' expects a python list"):
        parse_hyper_line(f"learner choice [{_payload(marker)}]", "hyper.test:1")
    param = parse_hyper_line(f"learner choice ['{_payload(marker)}', 'adam']", "hyper.test:1")
    assert param.values == [_payload(marker), "adam"]
    assert not marker.exists()


def test_a_payload_in_a_ray_trial_runs_nothing(tmp_path):
    """The issue's reproduction: a ``hyper.test`` choice holding Python, through a real Ray Tune
    search; each trial's value reaches RecBole's ``Config`` in a Ray worker as a plain string."""
    pytest.importorskip("ray")
    marker = tmp_path / "pwned"
    write_tiny_dataset(tmp_path / "data")
    (tmp_path / "hyper.test").write_text(f"learner choice ['{_payload(marker)}']\n")
    proc = _cli(*SASREC, f"--tune={tmp_path / 'hyper.test'}", "--num_samples=1", "--cpus_per_trial=1",
                f"--storage_path={tmp_path / 'ray'}", "--tune_name=p", f"--data_path={tmp_path / 'data'}",
                "--epochs=1", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not marker.exists()
    trials = [line for line in trials_table(proc.stdout)[1:] if "completed" in line]
    assert len(trials) == 1, proc.stdout[-3000:]
    results = list((tmp_path / "ray" / "p").glob("*/recbole_result.json"))
    assert results and json.loads(results[0].read_text())["test_result"]


def test_kd_dagfm_teacher_is_looked_up_not_evaluated(tmp_path):
    import recbole.model.context_aware_recommender.kd_dagfm as kd

    from recbole_iisan.utils.errors import UserError

    assert kd.eval("CrossNet") is kd.CrossNet and kd.eval("DAGFM") is kd.DAGFM
    marker = tmp_path / "pwned"
    with pytest.raises(UserError, match="config key 'teacher' must be one of"):
        kd.eval(_payload(marker))
    assert not marker.exists()
