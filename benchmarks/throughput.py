"""Client-rounds per minute of real training: fedsim's machinery against a loop with no orchestration.

One config (default: the tiny benchmark data at N=100, 10 % sampling, 3 rounds, 4 images per
client, FedAvg, frozen backbone, 1 thread per client job), two sides, measured one after the other
in this process:

  fedsim      an in-process ``Simulation`` (the code ``fedsim run``'s driver actor runs) on a
              private local Ray cluster of A CPUs with A client actors. Timed per round: its
              client phase (sampling, object-store put, the jobs on the actor pool, results back,
              virtual clock) and aggregation, the ``phase_seconds/clients`` + ``/aggregate``
              metrics it logs. Not timed: the server epoch (0 here), evaluation, MLflow and
              checkpoints (the same whatever runs the clients).
  sequential  the same clients, jobs and seeds trained one after another by one ``ClientWorker``
              (the class a client actor wraps) in this process, then the same strategy's
              ``aggregate``: no Ray, no serialisation, one core.

Both sides train the same images with the same code and end with the same global state (checked
to float tolerance). ``--actors 1 2 4`` repeats the fedsim side with more actors (and as many Ray
CPUs): beyond 1 the ratio shows how the client phase scales with cores (this machine has
``os.cpu_count()`` of them; more actors than cores only share them).

    python benchmarks/throughput.py                       # N=100, 10 %, 3 rounds, 1 2 4 actors

Last line: ``throughput ratio fedsim/sequential = X.XX`` (1 actor, same single core as the loop).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import fedsim  # noqa: F401  (offline environment before Ray and Ultralytics)

# isort: split
import numpy as np
import ray

from fedsim.config import ExperimentConfig
from fedsim.experiment import init_ray, prepare_data, prepare_weights
from fedsim.model.detector import build_detector, get_state, model_spec
from fedsim.preflight import load
from fedsim.runtime.client import ClientWorker
from fedsim.runtime.driver import Simulation
from fedsim.runtime.rounds import ClientPhase, ShardIndex, sample_clients
from fedsim.types import ClientResult
from strategies import build as build_strategy

REPO = Path(__file__).resolve().parents[1]


def config(num_clients: int, rate: float, rounds: int, actors: int) -> ExperimentConfig:
    return load(
        REPO / "configs" / "tiny.yaml",
        [
            f"clients.num_clients={num_clients}",
            f"clients.sampling_rate={rate}",
            f"clients.max_actors={actors}",
            f"rounds={rounds}",
            f"data.client_images={2 * num_clients}",  # 2 client domains: 4 images per client
            "train.warmup_epochs=0",
            "train.server_epochs=0",
            f"train.eval_every={rounds}",
            "train.pseudo_diagnostics=false",
            "tracking.keep_checkpoints=1",
        ],
    )


def fedsim_side(cfg: ExperimentConfig, actors: int, uri: str) -> tuple[float, int, dict]:
    """(timed seconds, client-rounds, final state)."""
    partition = prepare_data(cfg, echo=lambda _: None)
    init_ray(num_cpus=actors)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            sim = Simulation(cfg, Path(run_dir), Path(partition.root), prepare_weights(cfg), uri)
            seconds, jobs = 0.0, 0
            for rec in sim.run():
                if rec["event"] == "round" and rec["round"] > 0:
                    seconds += rec["phase_seconds/clients"] + rec["phase_seconds/aggregate"]
                    jobs += int(rec["clients/ok"])
            return seconds, jobs, sim.state()
    finally:
        ray.shutdown()


def sequential_side(cfg: ExperimentConfig) -> tuple[float, int, dict]:
    """The same rounds' clients one after another in this process: (timed seconds, client-rounds, state)."""
    partition = prepare_data(cfg, echo=lambda _: None)
    strategy = build_strategy(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes, prepare_weights(cfg)))
    worker = ClientWorker(cfg.model_dump(mode="json"), model_spec(model), get_state(model, list(model.state_dict())), 1)
    phase = ClientPhase(cfg, strategy, ShardIndex.from_partition(partition), partition.client_imgsz, pool=None)
    state = get_state(model, strategy.state_keys(model))
    seconds, count = 0.0, 0
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        selected, _ = sample_clients(strategy, cfg, rnd)
        results = [worker.run(job, state) for job in phase.jobs(rnd, selected)]
        kept = sorted((r for r in results if isinstance(r, ClientResult)), key=lambda r: r.client_id)
        state = strategy.aggregate(state, kept, rnd)
        seconds += time.perf_counter() - t0
        count += len(kept)
    return seconds, count, state


def same_state(a: dict, b: dict) -> float:
    """Largest absolute difference between two states' float entries."""
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].dtype.kind == "f")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    print(f"N={args.clients}, sampling {args.rate}, {args.rounds} rounds, {os.cpu_count()} cores on this machine")
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        seq_s, seq_jobs, seq_state = sequential_side(config(args.clients, args.rate, args.rounds, 1))
        seq_rate = 60 * seq_jobs / seq_s
        print(f"sequential   1 core   {seq_jobs} client-rounds in {seq_s:7.2f} s  {seq_rate:8.1f} client-rounds/min")
        ratios = {}
        for actors in args.actors:
            fed_s, fed_jobs, fed_state = fedsim_side(config(args.clients, args.rate, args.rounds, actors), actors, uri)
            if fed_jobs != seq_jobs:
                raise SystemExit(f"fedsim trained {fed_jobs} client-rounds, the loop {seq_jobs}: not the same work")
            rate = 60 * fed_jobs / fed_s
            ratios[actors] = rate / seq_rate
            print(
                f"fedsim  {actors} actor(s)  {fed_jobs} client-rounds in {fed_s:7.2f} s  {rate:8.1f} client-rounds/min"
                f"  ratio {ratios[actors]:.2f}  (final state max |diff| vs loop {same_state(fed_state, seq_state):.1e})"
            )
    first = args.actors[0]
    print(f"throughput ratio fedsim/sequential = {ratios[first]:.2f}" + ("" if first == 1 else f" ({first} actors)"))


if __name__ == "__main__":
    main()
