"""recbole_iisan/trainer/checkpoint_file.py and legacy_checkpoint.py: a checkpoint the plugin writes
is safetensors + JSON (read with safetensors or torch's safe loader alone); a pickle checkpoint is
read with an allow-list, and one that would run code is refused in one line, through the real
command line, for every command that loads a checkpoint."""
from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
SASREC = ["--model=SASRec", "--dataset=tiny", "--hidden_size=16", "--embedding_size=16", "--inner_size=32",
          "--n_layers=1", "--n_heads=1", "--train_batch_size=256", "--eval_batch_size=256", "--state=error"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return subprocess.run([sys.executable, str(REPO / "run_recbole_iisan.py"), *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SASRec trained one epoch by the real command line."""
    root = tmp_path_factory.mktemp("ckfile")
    write_tiny_dataset(root / "data")
    out = root / "res.json"
    proc = _cli(*SASREC, f"--data_path={root / 'data'}", f"--checkpoint_dir={root / 'saved'}", f"--result_file={out}",
                "--epochs=1", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "data": root / "data", "ckpt": Path(json.loads(out.read_text())["checkpoint"])}


# --------------------------------------------------------------------------------------------
# the plugin's own format

def test_plugin_checkpoint_is_read_by_safetensors_and_torch_safe_loaders_alone(trained):
    from safetensors import safe_open

    from recbole_iisan.serving.recommend import load_run

    ck = trained["ckpt"]
    assert ck.suffix == ".safetensors" and ck.read_bytes()[:2] != b"PK"  # not a torch zip (pickle)
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "recbole_iisan.checkpoint" and meta["model"] == "SASRec" and meta["dataset"] == "tiny"
    state = json.loads(meta["state"])  # plain JSON: the config as the user gave it, the training state
    assert state["config"]["values"]["hidden_size"] == 16 and state["config"]["values"]["epochs"] == 1
    assert state["epoch"] == 0 and isinstance(state["best_valid_score"], float)
    # the optimizer's moments are tensors of the file, its hyper-parameters JSON
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)
    assert any(k.startswith("optimizer/state/") and k.endswith("exp_avg") for k in tensors)
    # torch's own safe loader (weights_only=True, the default) reads the same tensors
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10):
        by_torch = torch.load(ck, weights_only=True)
        assert set(by_torch) == set(tensors) and all(torch.equal(by_torch[k], tensors[k]) for k in tensors)
    # and they are the parameters --recommend serves
    model = load_run(ck).model
    own = model.state_dict()
    assert set(own) == {k[len("state_dict/"):] for k in tensors if k.startswith("state_dict/")}
    assert all(torch.equal(own[k], tensors[f"state_dict/{k}"]) for k in own)


# --------------------------------------------------------------------------------------------
# pickle checkpoints: allow-list, refusal, --trust_checkpoint

class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, protocol: int = 4) -> Path:
    """A RecBole-shaped checkpoint whose config is the payload."""
    torch.save({"config": _Payload(marker), "epoch": 0, "state_dict": {"w": torch.zeros(2)}}, path,
               pickle_protocol=protocol)
    return path


def _assert_refused(proc: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the pickle's code ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), proc.stderr[-3000:]
    assert str(path) in errors[0] and "--trust_checkpoint" in errors[0] and "posix.system" in errors[0]


@pytest.mark.parametrize("command", ["recommend", "export", "new_items", "resume"])
def test_a_malicious_pickle_runs_nothing_and_is_refused_in_one_line(trained, tmp_path, command):
    marker = tmp_path / "pwned"
    evil = _malicious(tmp_path / "evil.pth", marker)
    (tmp_path / "new.tsv").write_text("n1\tred box\n")
    args = {"recommend": [f"--recommend={evil}", "--users=u1"],
            "export": [f"--recommend={evil}", f"--export={tmp_path / 'ex'}"],
            "new_items": [f"--recommend={evil}", "--users=u1", f"--new_items={tmp_path / 'new.tsv'}"],
            "resume": [*SASREC, f"--data_path={trained['data']}", f"--checkpoint_dir={tmp_path / 'saved'}",
                       f"--resume={evil}", "--epochs=2"]}[command]
    proc = _cli(*args, cwd=tmp_path)
    _assert_refused(proc, evil, marker)
    assert not (tmp_path / "ex").exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_refusal_holds_for_both_pickle_protocols_and_a_bare_pickle(tmp_path, protocol):
    """Protocol 2 is read by torch's own ``weights_only=True`` unpickler, protocol 4 (RecBole's)
    by the allow-list unpickler, a bare ``pickle.dump`` by torch's legacy reader: all refuse."""
    from recbole_iisan.trainer import checkpoint
    from recbole_iisan.utils.errors import CheckpointError

    marker = tmp_path / "pwned"
    files = [_malicious(tmp_path / f"evil{protocol}.pth", marker, protocol), tmp_path / "bare.pkl"]
    with open(files[1], "wb") as f:
        pickle.dump({"epoch": 0, "state_dict": {}, "x": _Payload(marker)}, f, protocol=protocol)
    for path in files:
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path)
        assert "posix.system" in str(info.value) and str(path) in str(info.value)
        assert "\n" not in str(info.value)
    assert not marker.exists()


def _recbole_checkpoint(tiny_data: Path, tmp_path: Path) -> tuple:
    """A checkpoint written by RecBole's own Trainer (the whole Config pickled, protocol 4)."""
    from recbole.config import Config
    from recbole.data import data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    from recbole_iisan.data.utils import recbole_dataset

    config = Config(model="SASRec", dataset="tiny", config_dict={
        "data_path": str(tiny_data), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "epochs": 1,
        "hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "checkpoint_dir": str(tmp_path / "saved"),
        "show_progress": False, "state": "error", "train_neg_sample_args": None, "loss_type": "CE", "use_gpu": False})
    train, _, _ = data_preparation(config, recbole_dataset(config))
    trainer = Trainer(config, SASRec(config, train._dataset))
    trainer._save_checkpoint(0, verbose=False)
    return trainer, Path(trainer.saved_model_file)


def test_a_recbole_checkpoint_loads_through_the_allow_list(tiny_data, tmp_path):
    """RecBole's own checkpoint (its Config, model class and enums pickled) loads without running
    RecBole's code: the config comes back as data, the tensors equal a trusted load's."""
    import recbole.trainer.trainer as rb_trainer

    from recbole_iisan.trainer import checkpoint

    trainer, path = _recbole_checkpoint(tiny_data, tmp_path)
    # RecBole's modules keep torch's safe default: RecBole's own torch.load of its file is refused
    assert rb_trainer.torch is torch and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    ck = checkpoint.load(path)
    trusted = torch.load(path, weights_only=False)  # our own file, in the test only
    assert set(ck["state_dict"]) == set(trusted["state_dict"])
    assert all(torch.equal(ck["state_dict"][k], trusted["state_dict"][k]) for k in trusted["state_dict"])
    assert ck["config"]["model"] == "SASRec" and ck["config"]["dataset"] == "tiny"
    assert ck["config"]["values"]["hidden_size"] == 8 and ck["config"]["values"]["loss_type"] == "CE"
    assert {k: ck[k] for k in ("epoch", "cur_step")} == {"epoch": 0, "cur_step": 0}
    for group, theirs in zip(ck["optimizer"]["param_groups"], trusted["optimizer"]["param_groups"]):
        assert group == theirs
    # --recommend serves it with the run's own settings (RecBole's defaults, not the plugin's)
    from recbole_iisan.serving.recommend import load_run

    run = load_run(path)
    for key in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "n_layers", "loss_type"):
        assert run.config[key] == trainer.config[key], key
    own = run.model.state_dict()
    assert all(torch.equal(own[k], trusted["state_dict"][k].cpu()) for k in trusted["state_dict"])


def test_a_protocol_2_pickle_of_tensors_is_read_by_torchs_weights_only_unpickler(tmp_path, monkeypatch):
    from recbole_iisan.trainer import checkpoint, legacy_checkpoint

    def refuse(*a, **k):
        raise AssertionError("the fallback unpickler was used")

    monkeypatch.setattr(legacy_checkpoint.restricted_pickle, "load", refuse)
    sd = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    torch.save({"epoch": 3, "state_dict": sd, "best_valid_score": 0.25}, tmp_path / "p2.pth")
    ck = checkpoint.load(tmp_path / "p2.pth")
    assert ck["epoch"] == 3 and torch.equal(ck["state_dict"]["w"], sd["w"]) and ck["best_valid_score"] == 0.25


def test_trust_checkpoint_is_the_way_out(tmp_path, capsys):
    """A pickle naming a class outside the allow-list (harmless here: a Counter) is refused; with
    ``--trust_checkpoint`` torch loads it as it would (weights_only=False)."""
    from recbole_iisan.quick_start import cli
    from recbole_iisan.trainer import checkpoint
    from recbole_iisan.utils.errors import CheckpointError

    path = tmp_path / "old.pth"
    torch.save({"epoch": 0, "state_dict": {}, "counts": collections.Counter("aab")}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="collections.Counter.*--trust_checkpoint"):
        checkpoint.load(path)
    assert checkpoint.load(path, trust=True)["counts"] == collections.Counter("aab")
    assert checkpoint.trusted({"trust_checkpoint": True}) and not checkpoint.trusted({"trust_checkpoint": False})
    assert "--trust_checkpoint" in cli.build_parser().format_help() and "UNSAFE" in cli.build_parser().format_help()


def test_recboles_saved_dataset_and_dataloader_pickles_are_never_read(tiny_data, tmp_path):
    """RecBole unpickles ``<checkpoint_dir>/<dataset>-<class>.pth`` and
    ``<dataset>-for-<model>-dataloader.pth`` whenever they exist: the plugin builds both anew."""
    from recbole.data import data_preparation

    from recbole_iisan.config.configurator import build_config, get_model_class
    from recbole_iisan.data.utils import create_dataset

    marker = tmp_path / "pwned"
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("tiny-Dataset.pth", "tiny-for-BPR-dataloader.pth", "tiny-SequentialDataset.pth",
                 "tiny-for-SASRec-dataloader.pth"):
        with open(saved / name, "wb") as f:
            pickle.dump(_Payload(marker), f)
    for model in ("BPR", "SASRec"):
        config = build_config(model, "tiny", config_dict={"data_path": str(tiny_data), "checkpoint_dir": str(saved),
                                                          "state": "error", "show_progress": False})
        train, valid, test = data_preparation(config, create_dataset(config, get_model_class(model)))
        assert len(train.dataset) > 0
    assert not marker.exists()
