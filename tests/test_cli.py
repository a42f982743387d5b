"""The command line: a RecBole model end to end through the plugin's path, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recbole_iisan.quick_start import cli
from recbole_iisan.utils.errors import EXIT_USER_ERROR
from recbole_iisan.config.configurator import PluginConfigError, build_config, check_types, typed_keys

FAST = ["--epochs=1", "--train_batch_size=256", "--eval_batch_size=256", "--hidden_size=16",
        "--inner_size=32", "--n_layers=1", "--n_heads=1", "--embedding_size=16"]


def test_sasrec_end_to_end_writes_result_json(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "res.json"
    code = cli.main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--result_file={out}",
                     f"--checkpoint_dir={tmp_path / 'ckpt'}"] + FAST)
    assert code == 0
    res = json.loads(out.read_text())
    assert res["model"] == "SASRec" and res["dataset"] == "tiny"
    assert set(res["test_result"]) == {"hit@10", "ndcg@10"}
    assert 0.0 <= res["test_result"]["ndcg@10"] <= res["test_result"]["hit@10"] <= 1.0
    assert res["trainable_parameters"] > 0 and res["epochs_run"] == 1
    assert "SASRec on tiny: test hit@10" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model=NoSuchModel", "--dataset=tiny"], "unknown model 'NoSuchModel'"),
        (["--model=SASRec", "--dataset=nosuch"], "dataset 'nosuch' not found"),
        (["--model=SASRec", "--dataset=tiny", "--epochs=abc"], "config key 'epochs' must be int"),
        (["--model=SASRec", "--dataset=tiny", "--config_files=missing.yaml"], "config file not found: missing.yaml"),
        (["--model=SASRec", "--dataset=tiny", "stray"], "unrecognised argument"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected, tiny_data: Path, capsys) -> None:
    code = cli.main(args + [f"--data_path={tiny_data}"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_typed_keys_come_from_the_properties_comments() -> None:
    types = typed_keys()
    assert types["epochs"] == "int" and types["learning_rate"] == "float"
    check_types({"epochs": 3, "learning_rate": 1})  # an int is a valid float
    with pytest.raises(PluginConfigError, match="'learning_rate' must be float"):
        check_types({"learning_rate": "fast"})
    with pytest.raises(PluginConfigError, match="'epochs' must be int"):
        check_types({"epochs": True})


def test_paper_protocol_truncates_each_user_to_13(tmp_path: Path) -> None:
    from conftest import write_tiny_dataset

    from recbole_iisan.data.dataset import ProtocolSequentialDataset

    write_tiny_dataset(tmp_path, n_users=20, seq_len=(10, 20))
    cfg = dict(data_path=str(tmp_path), paper_protocol=True)
    ds = ProtocolSequentialDataset(build_config("SASRec", "tiny", config_dict=cfg))
    plain = ProtocolSequentialDataset(build_config("SASRec", "tiny", config_dict=dict(data_path=str(tmp_path))))
    raw = (tmp_path / "tiny" / "tiny.inter").read_text().splitlines()[1:]
    per_user: dict[str, int] = {}
    for line in raw:
        per_user[line.split("\t")[0]] = per_user.get(line.split("\t")[0], 0) + 1
    assert ds.inter_num == sum(min(n, 13) for n in per_user.values())
    assert plain.inter_num == sum(per_user.values())
