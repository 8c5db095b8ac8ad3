"""``run_sweep``: Ray Tune + Optuna (TPE) + ASHA over whole simulations, recorded in MLflow.

One trial is one simulation (``sweeps.trainable``); ASHA's time unit is the FL round. Optuna
proposes the configs (``ConcurrencyLimiter`` keeps at most ``max_concurrent_trials`` open, so
TPE sees results before it proposes more); a multi-objective sweep uses Optuna's multi-objective
TPE without early stopping and prints the Pareto front.

MLflow: each trial's child run is the simulation's own run (the same ``Simulation`` that
``fedsim run`` drives, given the tag ``mlflow.parentRunId``), and ``run_sweep`` creates the
parent run with ``MlflowClient``. We use neither ``setup_mlflow`` nor ``MLflowLoggerCallback``:
both would add a second writer per trial, whose records (Tune's flattened config and result
keys, one run per trial created on the driver, or a per-trial ``mlruns`` fallback, ray#36257)
differ from those of ``fedsim run``. With one writer per simulation, a sweep trial and a plain
run have identical params, per-round metrics and artifacts, written from wherever the
simulation runs, which works the same with a sqlite URI and with a tracking server.

Layout of ``storage`` (default ``runs/sweeps/<name>``): Tune's experiment state and
``trial_<id>/`` directories, ``sims/<trial_id>/`` (simulation checkpoints), ``parent_run.json``
(the MLflow parent, reused on resume), ``trials.csv`` and ``best_config.yaml`` (a full experiment
config that ``fedsim run`` accepts).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from fedsim.experiment import prepare_data, prepare_weights
from fedsim.preflight import check_or_raise, parse
from fedsim.tracking import resolve_uri
from sweeps import cluster
from sweeps.config import Sweep, SweepConfigError, load_sweep
from sweeps.parent import close_children, open_parent, record_best
from sweeps.results import best_trial, pareto_front, spent_epsilon, trial_table
from sweeps.trainable import TrialResources, TrialSetup, run_trial, trial_bundles


@dataclass
class SweepResult:
    name: str
    storage: Path
    parent_run_id: str
    trials: pd.DataFrame  # trial_id, status, rounds, run_id, the space's params, the objectives
    best: dict[str, Any] | None
    best_config: Path | None
    pareto: pd.DataFrame | None  # multi-objective only
    seconds: float


def trial_dirname(trial) -> str:
    """Short trial directories (Tune's default spells out every dotted parameter)."""
    return f"trial_{trial.trial_id}"


def build_search(sweep: Sweep):
    """The searcher and scheduler (and the TuneConfig metric/mode) for a sweep."""

    s = sweep.spec
    sampler_args = {"n_startup_trials": s.n_startup_trials} if s.n_startup_trials else {}
    sampler = optuna.samplers.TPESampler(seed=s.seed, **sampler_args)
    metric: str | list[str] = sweep.metrics if sweep.multi_objective else sweep.metrics[0]
    mode: str | list[str] = sweep.modes if sweep.multi_objective else sweep.modes[0]
    points = [dict(p) for p in s.points_to_evaluate] or None
    searcher = OptunaSearch(dict(sweep.space), metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent_trials)
    if sweep.multi_objective:
        return searcher, None, None, None
    scheduler = None
    if s.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=sweep.max_t,
            grace_period=s.scheduler.grace_period,
            reduction_factor=s.scheduler.reduction_factor,
        )
    return searcher, scheduler, metric, mode


def _trainable(sweep: Sweep, setup):

    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), TrialResources(sweep.base_raw))


def _tuner(sweep: Sweep, setup, resume: bool):

    trainable = _trainable(sweep, setup)
    if resume:
        print(f"sweep: resuming {sweep.storage}", flush=True)
        return tune.Tuner.restore(str(sweep.storage), trainable, resume_unfinished=True, resume_errored=True)
    searcher, scheduler, metric, mode = build_search(sweep)
    s = sweep.spec
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.storage.name,
            storage_path=str(sweep.storage.parent),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )


def write_best_config(sweep: Sweep, best: dict[str, Any], uri: str) -> Path:
    """The best trial as a complete experiment config for ``fedsim run``."""

    params = {k: best[k] for k in sweep.space}
    cfg = parse(sweep.trial_raw(params))
    cfg.tracking.experiment = sweep.experiment
    cfg.tracking.uri = uri
    objectives = ", ".join(f"{m}={best.get(m)}" for m in sweep.metrics)
    eps = spent_epsilon(best)
    if eps is not None and "privacy/epsilon" not in sweep.metrics:
        objectives += f"; privacy/epsilon={eps:.4g} at delta {cfg.privacy.delta:g}"
    header = (
        f"# Best trial {best['trial_id']} of sweep {sweep.name} ({sweep.path}): {objectives}\n"
        f"# Run it with: fedsim run {sweep.storage / 'best_config.yaml'}\n"
    )
    path = sweep.storage / "best_config.yaml"
    path.write_text(header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _show(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 40):
        print(f"\n{title}\n{table.to_string(index=False)}", flush=True)


def run_sweep(sweep_path: Path, resume: bool = False) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep described by a sweep YAML."""

    t0 = time.perf_counter()
    sweep = load_sweep(sweep_path)
    restorable = tune.Tuner.can_restore(str(sweep.storage))
    if restorable and not resume:
        raise SweepConfigError(
            f"sweep: {sweep.storage} already holds this sweep; continue it with --resume or choose another storage"
        )
    if resume and not restorable:
        print(f"sweep: nothing to resume in {sweep.storage}; starting the sweep", flush=True)
    base = parse(copy.deepcopy(sweep.base_raw))
    uri = resolve_uri(base.tracking.uri)
    sweep.storage.mkdir(parents=True, exist_ok=True)
    check_or_raise(base)  # bad data or weights: one line each, before Ray starts
    # Fill the data and weights caches once, here, rather than in racing trials.
    prepare_data(base)
    prepare_weights(base)
    parent = open_parent(sweep.storage, uri, sweep.experiment, sweep.name, sweep.mlflow_params())
    setup = TrialSetup(sweep.name, sweep.base_raw, uri, parent.run_id, str(sweep.storage / "sims"))
    bundles = trial_bundles(base)
    started = cluster.start(bundles, sweep.spec.max_concurrent_trials)
    try:
        cluster.check_fits(bundles)
        grid = _tuner(sweep, setup, resume and restorable).fit()
        trials = trial_table(grid, list(sweep.space), sweep.metrics, sweep.rounds)
        runs = close_children(parent, trials)
        trials.insert(3, "run_id", trials["trial_id"].map(runs))
        trials.to_csv(sweep.storage / "trials.csv", index=False)
        _show(f"sweep {sweep.name}: {len(trials)} trials", trials)
        pareto = pareto_front(trials, sweep.metrics, sweep.modes) if sweep.multi_objective else None
        if pareto is not None:
            _show(
                "Pareto front (" + ", ".join(f"{m} {d}" for m, d in zip(sweep.metrics, sweep.modes, strict=True)) + ")",
                pareto,
            )
        best = best_trial(trials, sweep.metrics, sweep.modes)
        best_config = None
        if best is not None:
            best_config = write_best_config(sweep, best, uri)
            record_best(parent, best, runs.get(best["trial_id"]), list(sweep.space), sweep.rounds)
            print(f"\nbest trial {best['trial_id']}: " + ", ".join(f"{m}={best[m]}" for m in sweep.metrics), flush=True)
            eps = spent_epsilon(best)
            if eps is not None:
                print(f"best trial privacy/epsilon: {eps:.4g} (DP run; delta as in its config)", flush=True)
            print(f"best config: {best_config}", flush=True)
        counts = trials["status"].value_counts()
        parent.log_metrics(
            {f"sweep/{k.lower()}": float(counts.get(k, 0)) for k in ("COMPLETED", "STOPPED", "ERROR")}, step=0
        )
        parent.log_artifact(sweep.storage / "trials.csv")
        if best_config is not None:
            parent.log_artifact(best_config)
        parent.finish("FINISHED")
    except BaseException as exc:
        parent.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    return SweepResult(
        name=sweep.name,
        storage=sweep.storage,
        parent_run_id=parent.run_id,
        trials=trials,
        best=best,
        best_config=best_config,
        pareto=pareto,
        seconds=time.perf_counter() - t0,
    )
