"""Ray Tune search: hyper.test parsing, and a real 2-trial search with a local Ray on CPU."""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import trials_table

from recbole_iisan.config.configurator import PluginConfigError, parse_overrides
from recbole_iisan.config.configurator import parse_value as convert_value
from recbole_iisan.quick_start.tune import trial_config_dict
from recbole_iisan.trainer.hyper_tuning import (
    parse_hyper_file,
    parse_hyper_line,
    search_space,
)

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "hyper.test") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------------------------
# hyper.test

def test_parse_each_type(tmp_path):
    path = _write(tmp_path, "\n".join([
        "# a comment",
        "",
        "learning_rate loguniform -8,0",
        "embedding_size choice [32, 64, 128]",
        "layer_scheme choice ['even','all','top']   # trailing comment",
        "hidden_dropout_prob uniform 0.1,0.5",
        "inner_size quniform 64,256,64",
        "weight_decay quniform 0.0,0.1,0.05",
    ]))
    ps = {p.name: p for p in parse_hyper_file(path)}
    assert list(ps) == ["learning_rate", "embedding_size", "layer_scheme", "hidden_dropout_prob", "inner_size",
                        "weight_decay"]
    assert ps["embedding_size"].values == [32, 64, 128]
    assert ps["layer_scheme"].values == ["even", "all", "top"]
    assert ps["hidden_dropout_prob"].values == [0.1, 0.5]
    assert ps["learning_rate"].lineno == 3

    space = search_space(ps.values())
    # loguniform bounds are natural logs, as in RecBole / hyperopt: exp(-8)..exp(0)
    lr = space["learning_rate"]
    assert math.isclose(lr.lower, math.exp(-8)) and math.isclose(lr.upper, 1.0)
    draws = lr.sample(size=2000)
    assert all(math.exp(-8) <= x <= 1.0 for x in draws)
    logs = sorted(math.log(x) for x in draws)
    assert -4.6 < logs[len(logs) // 2] < -3.4  # log-uniform: the median of log(x) is near -4
    assert sum(x < math.exp(-6) for x in draws) > 300  # a quarter of the draws below exp(-6)

    assert sorted(space["embedding_size"].categories) == [32, 64, 128]
    u = space["hidden_dropout_prob"].sample(size=200)
    assert all(0.1 <= x <= 0.5 for x in u)
    q = space["inner_size"].sample(size=200)  # integral bounds: integers on the grid
    assert all(float(x).is_integer() and x % 64 == 0 and 64 <= x <= 256 for x in q)
    assert ps["inner_size"].is_int and not ps["weight_decay"].is_int
    d = trial_config_dict({}, {"inner_size": q[0], "weight_decay": 0.05}, int_keys=["inner_size"])
    assert type(d["inner_size"]) is int and d["weight_decay"] == 0.05
    wd = space["weight_decay"].sample(size=200)
    assert all(any(math.isclose(x, g, abs_tol=1e-9) for g in (0.0, 0.05, 0.1)) for x in wd)


@pytest.mark.parametrize("line,expected", [
    ("learning_rate loguniform -8", "loguniform"),
    ("learning_rate uniform a,b", "numbers"),
    ("embedding_size choice 32,64", "python list"),
    ("embedding_size choice [32, 64", "python list"),
    ("embedding_size pick [32,64]", "unknown type"),
    ("embedding_size", "name type values"),
    ("x quniform 1,8,0", "q > 0"),
    ("x uniform 0.5,0.1", "low < high"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, expected):
    path = _write(tmp_path, "# header\nlearning_rate loguniform -8,0\n\n" + line + "\n")
    with pytest.raises(PluginConfigError) as info:
        parse_hyper_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:4: ") and expected in msg and "\n" not in msg


def test_duplicate_and_empty(tmp_path):
    with pytest.raises(PluginConfigError, match=r":2: 'a' is already defined on line 1"):
        parse_hyper_file(_write(tmp_path, "a uniform 0,1\na uniform 0,2\n"))
    with pytest.raises(PluginConfigError, match="no parameters"):
        parse_hyper_file(_write(tmp_path, "# nothing\n", "empty.test"))
    assert parse_hyper_line("   # only a comment", "f:1") is None


def test_default_hyper_test_parses():
    ps = {p.name: p for p in parse_hyper_file(str(REPO / "hyper.test"))}
    assert {"learning_rate", "sanb_size", "embedding_size", "hidden_dropout_prob", "layer_scheme",
            "train_batch_size"} <= set(ps)
    assert ps["embedding_size"].values == [32, 64, 128]
    assert ps["layer_scheme"].values == ["even", "all", "top"]


def test_overrides_convert_like_recbole():
    assert convert_value("0.01") == 0.01 and convert_value("64") == 64
    assert convert_value("[1,2]") == [1, 2] and convert_value("true") is True
    assert convert_value("even") == "even" and convert_value("cpu") == "cpu"
    assert parse_overrides(["--epochs=2", "--data_path=data/x", "--learning_rate=2e-4"]) == {
        "epochs": 2, "data_path": "data/x", "learning_rate": 2e-4}
    # one parser for every entry point: a stray argument or a key given twice is a one-line error
    with pytest.raises(PluginConfigError, match="unrecognised argument '--bad'"):
        parse_overrides(["--bad"])
    with pytest.raises(PluginConfigError, match="'epochs' is given twice"):
        parse_overrides(["--epochs=2", "--epochs=3"])
    d = trial_config_dict({"epochs": 2}, {"learning_rate": 1e-3}, {"recsys": 2e-4, "text_sanb": 1e-4})
    assert d["iisan_lr"] == {"recsys": 1e-3, "text_sanb": 1e-4} and d["show_progress"] is False


@pytest.mark.parametrize("name", ["hyperopt", "optuna"])
def test_search_algorithms_sample_the_space_within_bounds(name):
    """``--search_alg=hyperopt|optuna`` on the current Ray Tune (numpy 2): seeded suggestions from
    the repository's hyper.test, each value inside its line's bounds, the same for the same seed."""
    pytest.importorskip(name)
    from recbole_iisan.trainer.hyper_tuning import _search_alg

    params = {p.name: p for p in parse_hyper_file(str(REPO / "hyper.test"))}

    def draws(seed):
        alg = _search_alg(name, "ndcg@10", 0, seed)
        assert alg.set_search_properties("ndcg@10", "max", search_space(params.values()))
        return [alg.suggest(f"t{i}") for i in range(3)]

    first = draws(7)
    assert first == draws(7)
    for cfg in first:
        assert set(cfg) == set(params)
        for k, hp in params.items():
            if hp.kind == "choice":
                assert cfg[k] in hp.values, (k, cfg[k])
            elif hp.kind == "loguniform":
                assert math.exp(hp.values[0]) <= cfg[k] <= math.exp(hp.values[1]), (k, cfg[k])
            else:
                assert hp.values[0] <= cfg[k] <= hp.values[1], (k, cfg[k])


# --------------------------------------------------------------------------------------------
# a real search

def _tiny_dataset(root: Path, name: str = "tiny", n_users: int = 60, n_items: int = 40, per_user: int = 8) -> None:
    from conftest import write_atomic_files

    rng = random.Random(0)
    sequences = {}
    for u in range(n_users):
        start = rng.randrange(n_items)
        # a mostly sequential walk: learnable, so the metric is not all zeros
        sequences[f"u{u}"] = [f"i{(start + k + (rng.random() < 0.2)) % n_items}" for k in range(per_user)]
    write_atomic_files(root, name, sequences)


def _ray_processes() -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "default_worker.py" in cmd) \
                and _is_descendant(int(pid)):
            out.add(int(pid))
    return out


def _is_descendant(pid: int) -> bool:
    """Whether ``pid`` descends from this test process (Ray processes started by this test)."""
    me = os.getpid()
    for _ in range(50):
        if pid == me:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_real_search_sasrec(tmp_path, local_ray, monkeypatch, capsys):
    from recbole_iisan.quick_start import cli

    _tiny_dataset(tmp_path / "data")
    hyper = _write(tmp_path, "learning_rate loguniform -7,-4\nhidden_dropout_prob choice [0.1,0.3]\n")
    monkeypatch.chdir(tmp_path)  # RecBole's log/ and saved/ of the driver go here
    argv = ["--model=SASRec", "--dataset=tiny", f"--tune={hyper}", "--num_samples=2", "--cpus_per_trial=1",
            f"--storage_path={tmp_path / 'ray_results'}", "--tune_name=t",
            f"--data_path={tmp_path / 'data'}", "--epochs=2", "--hidden_size=16", "--inner_size=32",
            "--n_layers=1", "--n_heads=1", "--train_batch_size=64", "--eval_batch_size=256", "--state=warning"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_iisan.py"] + argv)
    rc = cli.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out

    table = trials_table(out)
    assert " ".join(table[0].split()).startswith("| trial | learning_rate | hidden_dropout_prob | best valid ndcg@10 |")
    assert len(table) == 1 + 2  # header + 2 trials
    assert all(("completed" in l) or ("stopped early by ASHA" in l) for l in table[1:]), out
    assert "best trial" in out and "test:  hit@10" in out

    exp = tmp_path / "ray_results" / "t"
    best = exp / "best_config.yaml"
    assert best.is_file() and (exp / "trials.csv").is_file()
    # each finished trial keeps RecBole's result next to (not over) Ray Tune's JSON-lines result.json
    finished = list(exp.glob("*/recbole_result.json"))
    assert finished and all(json.loads(f.read_text())["test_result"] for f in finished)
    for f in exp.glob("*/result.json"):
        assert all(json.loads(line) for line in f.read_text().splitlines())
    cfg = yaml.safe_load(best.read_text())
    assert {"learning_rate", "hidden_dropout_prob"} <= set(cfg)
    assert math.exp(-7) <= cfg["learning_rate"] <= math.exp(-4) and cfg["hidden_dropout_prob"] in (0.1, 0.3)
    assert cfg["epochs"] == 2 and cfg["hidden_size"] == 16  # the fixed overrides come along

    # --config_files accepts it: a RecBole Config built from it has the tuned values, type-checked
    from recbole_iisan.config.configurator import build_config

    monkeypatch.setattr(sys, "argv", ["x"])
    conf = build_config("SASRec", "tiny", [str(best)])
    assert conf["learning_rate"] == pytest.approx(cfg["learning_rate"]) and conf["hidden_size"] == 16

    # a finished search is not silently restarted
    monkeypatch.setattr(sys, "argv", ["run_recbole_iisan.py"] + argv)
    assert cli.main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_interrupted_search_resumes_and_a_failing_trial_is_listed(tmp_path, monkeypatch, capsys):
    """A search interrupted by Ctrl-C (SIGINT to the driver, after its first trial finished) goes
    on with ``--resume`` (``tune.Tuner.restore``): the finished trial is not run again, the rest
    run, and a trial that fails (16 hidden units cannot be split over 3 heads) is listed with its
    error while the others complete."""
    import signal
    import subprocess
    import time

    from recbole_iisan.quick_start import cli

    pytest.importorskip("ray")
    _tiny_dataset(tmp_path / "data")
    # n_heads 3 fails in SASRec's constructor; grid over it so both values are tried
    hyper = _write(tmp_path, "n_heads choice [1,3]\nlearning_rate loguniform -7,-4\n")
    storage = tmp_path / "ray_results"
    argv = ["--model=SASRec", "--dataset=tiny", f"--tune={hyper}", "--num_samples=4", "--max_concurrent=1",
            "--cpus_per_trial=1", f"--storage_path={storage}", "--tune_name=r", f"--data_path={tmp_path / 'data'}",
            "--epochs=2", "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--train_batch_size=64",
            "--eval_batch_size=256", "--state=warning"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "driver.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "run_recbole_iisan.py"), *argv], cwd=tmp_path, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not list(storage.glob("r/*/recbole_result.json")) and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            first = list(storage.glob("r/*/recbole_result.json"))
            assert first, log.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Ray Tune saves the experiment state and stops
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log.read_text()
    assert "the search was interrupted: continue it with the same command and --resume" in out, out[-3000:]
    # the summary counts the unfinished trials: those the table lists as interrupted plus those
    # Ray Tune had not created yet when Ctrl-C came (which of the two depends on timing)
    summary = re.search(r"SASRec on tiny: (\d+) trials in \d+ s \((\d+) completed, .*?, (\d+) interrupted\)", out)
    assert summary, out[-3000:]
    listed = out.count("interrupted (continue with --resume)")
    assert int(summary.group(3)) == listed + 4 - int(summary.group(1)) >= 1
    done_before = {f: f.stat().st_mtime_ns for f in storage.glob("r/*/recbole_result.json")}
    assert 1 <= len(done_before) < 4

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["run_recbole_iisan.py"] + argv + ["--resume"])
    rc = cli.main(argv + ["--resume"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "resuming the search from" in out
    table = trials_table(out)
    assert len(table) == 1 + 4, out
    rows = {l.split("|")[1].strip(): l for l in table[1:]}
    for row in rows.values():
        heads = row.split("|")[2].strip()
        if heads == "3":  # listed with the model's own error, not hidden
            assert "error: " in row and "multiple of the number of attention heads" in row, row
        else:
            assert ("completed" in row) or ("stopped early by ASHA" in row), row
    assert any(r.split("|")[2].strip() == "3" for r in rows.values()), out  # a failing trial was sampled
    assert "the search was interrupted" not in out and "interrupted (continue" not in out
    # the trials that had finished were not run again
    for f, mtime in done_before.items():
        assert f.stat().st_mtime_ns == mtime, f


def test_malformed_hyper_file_exit_code_2(tmp_path, monkeypatch, capsys):
    from recbole_iisan.quick_start import cli

    bad = _write(tmp_path, "learning_rate loguniform -8,0\nembedding_size choice 32 64\n")
    argv = ["--model=SASRec", "--dataset=ml-100k", f"--tune={bad}"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_iisan.py"] + argv)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:2: ") and "\n" not in err


def test_no_ray_processes_left():
    """Runs last in this file: the searches above shut their Ray down."""
    import time

    deadline = time.time() + 15
    while _ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes()
