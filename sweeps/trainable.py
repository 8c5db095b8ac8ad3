"""One Tune trial = one whole simulation, run in the trial's own process.

The trial reports once per FL round (not for the round-0 warm-up), so ``training_iteration``
is the round and ASHA's ``grace_period``/``max_t`` count rounds; the last round is reported
only once the simulation is done (``TuneReport``, one more simulation callback). Each report
carries a tiny Tune checkpoint holding only the round number; the model state lives in the
simulation's own checkpoints under ``<storage>/sims/<trial_id>``. A trial that Tune restarts (``FailureConfig``
retry, or ``Tuner.restore`` after a kill) resumes that simulation, continuing the same MLflow
run, and re-reports the rounds Tune has not seen, so the iteration count stays equal to the round.

Resources: ``trial_resources`` reserves the trial process and its client actors in one
placement group. Tune makes the trial capture its child actors into that group, so the client
pool can never wait for CPUs that other trials hold (the nested-actor deadlock of ray#25239).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from fedsim.config import ExperimentConfig
from fedsim.experiment import prepare_data, prepare_weights
from fedsim.preflight import parse
from fedsim.runtime.callbacks import Callback, RunView, latest_checkpoint
from fedsim.runtime.driver import Simulation
from fedsim.runtime.resources import ProfileAssignment, actor_options
from fedsim.runtime.rounds import jobs_per_round
from strategies import get
from sweeps.config import with_params

DRIVER_BUNDLE = {"CPU": 1.0}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (shipped once through the object store)."""

    sweep: str
    base_raw: dict
    tracking_uri: str
    parent_run_id: str
    sims_dir: str


def client_bundle(clients) -> dict[str, float]:
    """One client actor's reservation: the pool profile of ``clients.profile`` (zero amounts left out).

    The driver's pool actors all reserve the element-wise maximum of the profiles in use, so the
    bundles must hold exactly that.
    """

    opts = actor_options(ProfileAssignment.from_config(clients).pool_profile())
    bundle = {"CPU": float(opts["num_cpus"]), "GPU": float(opts["num_gpus"]), "memory": float(opts["memory"])}
    return {k: v for k, v in bundle.items() if v > 0}


def client_pool_size(cfg) -> int:
    """Client actors a trial keeps: the jobs of one round (over-selection included), capped by max_actors."""

    jobs = jobs_per_round(cfg.clients)
    return min(jobs, cfg.clients.max_actors) if cfg.clients.max_actors else jobs


def trial_bundles(cfg) -> list[dict[str, float]]:

    uses_clients = get(cfg.strategy.name).uses_clients
    k = client_pool_size(cfg) if uses_clients else 0
    return [dict(DRIVER_BUNDLE)] + [client_bundle(cfg.clients)] * k


@dataclass(frozen=True)
class TrialResources:
    """``tune.with_resources`` callable: a trial's placement group from its own config.

    Per trial, because the space may move ``clients.*``; a class (not a closure) so Tune can
    pickle it with the experiment state.
    """

    base_raw: dict

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory(trial_bundles(trial_config(self.base_raw, config)), strategy="PACK")


def trial_config(base_raw: dict, params: dict[str, Any]) -> ExperimentConfig:

    return parse(with_params(base_raw, params))


def _reported_round() -> int:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        return int(json.loads((Path(d) / "round.json").read_text())["round"])


def _report(rec: dict[str, Any]) -> None:
    metrics = {k: v for k, v in rec.items() if k != "event"}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "round.json").write_text(json.dumps({"round": int(rec["round"])}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


class TuneReport(Callback):
    """Reports each FL round to Tune once (``training_iteration`` = round; the warm-up is not reported).

    The last round is held back until the simulation has saved its final state and closed its
    MLflow run: ASHA stops every trial at ``max_t`` as soon as it is reported. A resumed trial
    first re-reports the rounds the simulation finished but Tune never heard of (killed between
    the two).
    """

    def __init__(self, rounds: int, reported: int):
        self.rounds = rounds
        self.reported = reported
        self.final: dict[str, Any] | None = None

    def _offer(self, record: dict[str, Any]) -> None:
        rnd = int(record["round"])
        if rnd <= self.reported:
            return
        if rnd == self.rounds:
            self.final = record
            return
        _report(record)
        self.reported = rnd

    def on_resume(self, sim: RunView, rnd: int) -> None:
        for old in sim.history:
            if old["round"] <= rnd:
                self._offer(old)

    def on_round_end(self, sim: RunView, rnd: int, metrics: dict[str, float]) -> None:
        self._offer({"round": rnd, **metrics})

    def on_run_end(self, sim: RunView, status: str) -> None:
        if status == "FINISHED" and self.final is not None:
            _report(self.final)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: ``config`` holds the sampled values by dotted config path."""

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.base_raw, config)
    cfg.tracking.uri = setup.tracking_uri
    cfg.tracking.run_name = f"{setup.sweep}-{trial_id}"
    cfg.tracking.keep_checkpoints = 1  # resuming needs the newest only, and 40 trials add up
    partition = prepare_data(cfg)
    weights = prepare_weights(cfg)
    run_dir = Path(setup.sims_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    sim = Simulation(
        cfg,
        run_dir,
        Path(partition.root),
        weights,
        setup.tracking_uri,
        resume=latest_checkpoint(run_dir) is not None,
        extra_tags={"mlflow.parentRunId": setup.parent_run_id, "sweep": setup.sweep, "trial_id": trial_id},
        pool_size=client_pool_size(cfg),
        callbacks=[TuneReport(cfg.rounds, _reported_round())],
    )
    for _ in sim.run():
        pass
