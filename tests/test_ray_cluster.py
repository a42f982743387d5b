"""A Ray cluster that is really joined: two simulated nodes (``ray.cluster_utils.Cluster``, one
CPU each, on this machine) run a 2-trial search started with ``--ray_address=<cluster address>``;
results go to a shared storage path. With one CPU per node and ``--cpus_per_trial=1`` the two
trials can only run on different nodes; each trial reports the node that ran it. One epoch: ASHA
gets no intermediate report to stop a trial on, so both run to completion."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import trials_table

from test_tuning import _tiny_dataset, _write


@pytest.fixture
def two_node_cluster():
    pytest.importorskip("ray")
    import os

    import ray
    from ray.cluster_utils import Cluster

    # the nodes' workers import this checkout of the package (not another installed copy)
    repo = str(Path(__file__).resolve().parents[1])
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = repo + (os.pathsep + old_path if old_path else "")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def test_search_on_a_two_node_cluster(tmp_path, two_node_cluster, monkeypatch, capsys):
    import ray

    from recbole_iisan.quick_start import cli

    _tiny_dataset(tmp_path / "data")
    hyper = _write(tmp_path, "learning_rate loguniform -7,-4\nhidden_dropout_prob choice [0.1,0.3]\n")
    shared = tmp_path / "shared" / "ray_results"  # the folder every node writes to
    monkeypatch.chdir(tmp_path)
    argv = ["--model=SASRec", "--dataset=tiny", f"--tune={hyper}", "--num_samples=2", "--cpus_per_trial=1",
            f"--ray_address={two_node_cluster.address}", f"--storage_path={shared}", "--tune_name=c",
            f"--data_path={tmp_path / 'data'}", "--epochs=1", "--hidden_size=16", "--inner_size=32",
            "--n_layers=1", "--n_heads=1", "--train_batch_size=64", "--eval_batch_size=256", "--state=warning"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_iisan.py"] + argv)
    rc = cli.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out

    # the driver joined the cluster (it did not start its own Ray): two alive nodes, 1 CPU each
    ray.init(address=two_node_cluster.address)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and ray.cluster_resources().get("CPU") == 2
    ray.shutdown()

    table = trials_table(out)
    assert len(table) == 1 + 2 and all("completed" in l for l in table[1:]), out
    exp = shared / "c"
    assert (exp / "best_config.yaml").is_file() and (exp / "trials.csv").is_file()
    finals = []
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        finals += [r for r in rows if r.get("trial_finished")]
    assert len(finals) == 2
    ran_on = {r["node_id"] for r in finals}
    assert ran_on == nodes, (ran_on, nodes)  # one trial on each node
    for r in finals:
        assert json.loads(r["test_result"]) and Path(r["result_file"]).is_file()
        assert str(exp) in r["result_file"]  # written under the shared storage path
