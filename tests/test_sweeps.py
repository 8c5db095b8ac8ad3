"""Sweeps end to end on tiny.yaml: Tune + Optuna + ASHA, MLflow parent/child runs, best config, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from sweeps.config import SweepConfigError, load_sweep
from sweeps.results import best_trial, pareto_front
from sweeps.space import SpaceError, parse_space
from tests.conftest import REPO, fedsim_env, run_fedsim
from tests.sweep_support import STOPPED_LR, main_sweep, write_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return main_sweep(tmp_path_factory)


def child_runs(sweep) -> pd.DataFrame:
    mlflow.set_tracking_uri(sweep.uri)
    runs = mlflow.search_runs(experiment_names=[sweep.experiment])
    return runs[runs["tags.mlflow.parentRunId"] == sweep.result.parent_run_id]


# ---------------------------------------------------------------- space and sweep file (no Ray)


def test_space_types_and_errors():
    space = parse_space(
        {
            "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
            "strategy.params.num_experts": {"type": "int", "low": 2, "high": 6, "when": {"strategy.name": "fedmox"}},
            "train.batch": {"type": "int", "low": 4, "high": 16, "step": 4},
            "train.client_lr": {"type": "categorical", "choices": [None, 0.001]},
        },
        base={"strategy": {"name": "fedavg"}},
    )
    assert set(space) == {"train.lr", "train.batch", "train.client_lr"}  # num_experts only for fedmox
    assert space["train.lr"].log and space["train.batch"].step == 4
    bad = {
        "train.lr": ({"type": "float", "low": 0.1, "high": 0.01}, "space.train.lr: low must be <= high"),
        "train.ema": ({"type": "float", "low": 0, "high": 1, "log": True}, "space.train.ema: log scale needs low > 0"),
        "train.x": ({"type": "gauss", "low": 0}, "space.train.x: type must be one of"),
        "train.y": ({"type": "int", "low": 1.5, "high": 3}, "space.train.y: low must be an integer"),
        "train.z": ({"type": "categorical", "choices": []}, "space.train.z: categorical needs a non-empty list"),
        "train.w": ({"type": "float", "low": 0, "high": 1, "lg": True}, "space.train.w: unknown key(s) ['lg']"),
    }
    for name, (spec, message) in bad.items():
        with pytest.raises(SpaceError, match=re.escape(message)):
            parse_space({name: spec})


def test_sweep_file_errors_name_the_field(tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", "sqlite:///x.db", "x", num_samples=2, space={"train.lrr": {}})
    with pytest.raises(SweepConfigError, match="space.train.lrr: type must be one of"):
        load_sweep(path)
    path = write_sweep(
        tmp_path / "bad2.yaml",
        "sqlite:///x.db",
        "x",
        num_samples=2,
        space={"train.lrr": {"type": "int", "low": 1, "high": 2}},
    )
    with pytest.raises(SweepConfigError, match="train.lrr: unknown key"):
        load_sweep(path)
    path = write_sweep(tmp_path / "bad3.yaml", "sqlite:///x.db", "x", num_samples=0, mode="up", space={})
    with pytest.raises(SweepConfigError) as err:
        load_sweep(path)
    assert "sweep: num_samples" in str(err.value) and "sweep: mode" in str(err.value)


def test_repo_sweep_configs_parse():
    tiny = load_sweep(REPO / "configs" / "sweep_tiny.yaml")
    assert tiny.spec.num_samples == 8 and tiny.spec.max_concurrent_trials == 2 and tiny.rounds <= 3
    assert set(tiny.space) == {"train.lr", "train.conf_thres", "train.ema_momentum"}  # base is FedAvg
    raw = yaml_load(REPO / "configs" / "sweep_fedmox.yaml")
    assert raw["num_samples"] == 40
    assert {"strategy.params.num_experts", "strategy.params.alpha", "train.conf_thres", "train.lr"} <= set(raw["space"])


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_pareto_front_and_best():
    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["COMPLETED"] * 4,
            "map50/total": [0.5, 0.4, 0.3, 0.5],
            "client/peak_mem_mib": [300.0, 100.0, 200.0, 250.0],
        }
    )
    metrics, modes = ["map50/total", "client/peak_mem_mib"], ["max", "min"]
    front = pareto_front(table, metrics, modes)
    assert list(front["trial_id"]) == ["d", "b"]  # a is dominated by d, c by b
    assert best_trial(table, metrics, modes)["trial_id"] == "d"


def test_multi_objective_uses_no_asha(tmp_path):
    from sweeps.tune import build_search

    path = write_sweep(
        tmp_path / "multi.yaml",
        "sqlite:///x.db",
        "x",
        num_samples=2,
        objectives=[["map50/total", "max"], ["client/peak_mem_mib", "min"]],
        space={"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    )
    searcher, scheduler, metric, mode = build_search(load_sweep(path))
    assert scheduler is None and metric is None and mode is None
    assert searcher.searcher.metric == ["map50/total", "client/peak_mem_mib"]


# ---------------------------------------------------------------- the real sweep


def test_sweep_completes(sweep):
    trials = sweep.result.trials
    assert len(trials) == 4
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"}, trials
    storage = sweep.result.storage
    for name in ("trials.csv", "best_config.yaml", "parent_run.json"):
        assert (storage / name).is_file()
    assert (trials["rounds"] <= 3).all()


def test_asha_stops_the_weak_trial_early(sweep):
    trials = sweep.result.trials
    weak = trials[trials["train.lr"] == STOPPED_LR].iloc[0]
    assert weak["status"] == "STOPPED" and weak["rounds"] < 3
    # Tune's own record agrees: the trial reported fewer rounds than max_t.
    lines = (sweep.result.storage / f"trial_{weak['trial_id']}" / "result.json").read_text().splitlines()
    assert [json.loads(line)["training_iteration"] for line in lines] == list(range(1, weak["rounds"] + 1))
    assert (trials.loc[trials["status"] == "COMPLETED", "rounds"] == 3).all()


def test_every_trial_has_an_mlflow_child_run(sweep):
    runs = child_runs(sweep)
    trials = sweep.result.trials
    assert sorted(runs["tags.trial_id"]) == sorted(trials["trial_id"])
    client = MlflowClient(tracking_uri=sweep.uri)
    for _, t in trials.iterrows():
        run = runs[runs["tags.trial_id"] == t["trial_id"]].iloc[0]
        assert run["tags.sweep"] == "main" and run["run_id"] == t["run_id"]
        assert float(run["params.train.lr"]) == pytest.approx(t["train.lr"])
        assert float(run["params.train.conf_thres"]) == pytest.approx(t["train.conf_thres"])
        assert run["params.rounds"] == "3"
        assert run["status"] == ("FINISHED" if t["status"] == "COMPLETED" else "KILLED")
        assert run["tags.sweep.outcome"] == t["status"].lower()
        steps = [m.step for m in client.get_metric_history(t["run_id"], "map50/total")]
        assert steps == list(range(t["rounds"] + 1))  # warm-up + each round Tune saw, once each
    parent = client.get_run(sweep.result.parent_run_id)
    assert parent.data.tags["sweep.role"] == "parent" and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.num_samples"] == "4" and "space.train.lr" in parent.data.params
    best = sweep.result.best
    assert parent.data.tags["best.trial_id"] == best["trial_id"]
    assert parent.data.metrics["server/box_loss"] == pytest.approx(best["server/box_loss"])


def test_best_config_runs_with_fedsim_run(sweep, tmp_path):
    from fedsim.preflight import load

    best = sweep.result.best
    completed = sweep.result.trials[sweep.result.trials["status"] == "COMPLETED"]
    assert best["server/box_loss"] == completed["server/box_loss"].min()
    cfg = load(sweep.result.best_config)
    assert cfg.train.lr == pytest.approx(best["train.lr"]) and cfg.rounds == 3
    assert cfg.tracking.experiment == sweep.experiment
    result = run_fedsim(["run", str(sweep.result.best_config), "--set", "rounds=1"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mlflow.set_tracking_uri(sweep.uri)
    runs = mlflow.search_runs(experiment_names=[sweep.experiment], filter_string="params.rounds = '1'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert float(runs.iloc[0]["params.train.lr"]) == pytest.approx(best["train.lr"])


# ---------------------------------------------------------------- kill and resume


def trial_states(storage: Path) -> dict[str, str]:
    """trial_id -> status from Tune's newest experiment snapshot."""
    found = sorted(storage.glob("experiment_state-*.json"))
    if not found:
        return {}
    try:
        data = json.loads(found[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(d[0]) for d in data["trial_data"])}


def results_of(storage: Path, trial_id: str) -> list[str]:
    path = storage / f"trial_{trial_id}" / "result.json"
    return path.read_text().splitlines() if path.exists() else []


def test_kill_and_resume_runs_only_unfinished_trials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(
        tmp_path / "resume.yaml",
        uri,
        "test-resume",
        overrides=["rounds=3"],
        num_samples=2,
        max_concurrent_trials=1,
        scheduler=None,
        space={"train.lr": {"type": "float", "low": 5e-4, "high": 2e-3, "log": True}},
    )
    storage = tmp_path / "sweeps" / "resume"
    env = fedsim_env(TUNE_GLOBAL_CHECKPOINT_S="1")  # fresh experiment snapshots, so the kill lands mid-sweep
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "sweep", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    done, running = None, None
    deadline = time.monotonic() + 420
    try:
        # Kill once one trial has finished and the next has written its warm-up checkpoint (round 0):
        # its simulation and MLflow run exist, Tune has not seen a round of it yet.
        while time.monotonic() < deadline and proc.poll() is None:
            done = next((t for t, s in trial_states(storage).items() if s == "TERMINATED"), None)
            started = [p.parent.name for p in (storage / "sims").glob("*/rounds.csv") if p.parent.name != done]
            if done and started:
                running = started[0]
                break
            time.sleep(0.25)
        assert proc.poll() is None, "the sweep ended before it could be killed mid-way"
        assert done and running, f"no finished + started trial pair within the deadline: {trial_states(storage)}"
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    psutil.wait_procs(children, timeout=60)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "Ray outlived its driver"

    finished_before = results_of(storage, done)
    sim_rounds_before = (storage / "sims" / done / "rounds.csv").stat().st_mtime_ns

    result = run_fedsim(["sweep", str(path), "--resume"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    states = trial_states(storage)
    assert len(states) == 2 and set(states.values()) == {"TERMINATED"}, states  # no extra trial was created
    assert results_of(storage, done) == finished_before  # the finished trial was not run again
    assert (storage / "sims" / done / "rounds.csv").stat().st_mtime_ns == sim_rounds_before
    assert [json.loads(line)["training_iteration"] for line in results_of(storage, running)] == [1, 2, 3]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test-resume"])
    runs = runs[runs["tags.sweep.role"] != "parent"]
    assert sorted(runs["tags.trial_id"]) == sorted([done, running])  # one MLflow run per trial, reused on resume
    assert set(runs["status"]) == {"FINISHED"}
    client = MlflowClient(tracking_uri=uri)
    resumed = runs[runs["tags.trial_id"] == running].iloc[0]["run_id"]
    assert [m.step for m in client.get_metric_history(resumed, "server/box_loss")] == [0, 1, 2, 3]
