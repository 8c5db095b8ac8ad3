"""What fedsim's round machinery costs over a bare ``ray.util.ActorPool`` loop doing the same work.

Both sides run FedAvg over a no-op client on one local Ray cluster, in this process, with 2
actors, on a model of 3.0M float32 (yolov8n's size) held as numpy arrays:

  fedsim     ``rounds.ClientPhase`` + ``pool.ClientPool`` + ``client.ClientActor`` with
             ``clients.work=noop`` + the FedAvg strategy's ``aggregate``: the code
             ``Simulation._one_round`` runs for its client side (sampling with the strategy's
             generator, per-client seeds and profiles, the object-store put, failure handling,
             the virtual clock and straggler cut, sorting, sample-weighted averaging).
  actorpool  a minimal actor returning what it received, ``ActorPool.submit`` /
             ``get_next_unordered``, and the same sample-weighted float64 mean written out in numpy.

Timed: the client phase of each round (sample -> put -> jobs -> results -> aggregate), rounds 1..R
after one untimed warm-up round, with the actors already started. Not timed: the server's
supervised epoch, evaluation, MLflow and checkpoints (``Simulation`` adds those per round; they
are the same whatever the client machinery, and on a tiny model they would hide it). Every
client is sampled every round for the ratio; each configuration runs twice, alternating sides,
and the faster of the two is kept (the machine is shared). FedAvg's weighted mean costs about
twice an unweighted one (one more temporary per client); the bare loop does the weighted one too,
so the ratio measures the machinery and not the choice of arithmetic (both figures are printed).

Driver memory, measured first (before other runs have touched object-store pages): the fedsim
side at 5 % sampling for N=100 and N=1000, RSS and its private part (RSS minus shared pages,
i.e. without the object-store pages results are read from) after rounds 1 and R. The private
part is the driver's own and stays flat. The shared part grows over the first rounds from a cold
store: the store's allocator places each round's results on fresh pages until it has cycled
through about 1 GiB of them, then reuses them (300 rounds at N=100, 5 %: 2015 MiB RSS at round 40,
2039 MiB at round 300, private 401 -> 402 MiB). It is bounded by the store, not by N or rounds.

Last line: ``overhead ratio fedsim/actorpool = X.XX`` (N=100).
"""

from __future__ import annotations

import argparse
import time

import fedsim  # noqa: F401  (offline environment before Ray)

# isort: split
import numpy as np
import psutil
import ray
from ray.util import ActorPool

from fedsim.config import ClientsConfig, ExperimentConfig, clients_per_round
from fedsim.experiment import init_ray
from fedsim.runtime.client import ClientActor
from fedsim.runtime.pool import ClientPool
from fedsim.runtime.resources import ProfileAssignment, actor_options
from fedsim.runtime.rounds import ClientPhase, Shard, ShardIndex
from strategies import build as build_strategy

PARAMS = 3_000_000
ACTORS = 2


def model_state(total: int = PARAMS, pieces: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """``pieces`` float32 arrays of uneven size summing to ``total`` values, like a detector's layers."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, total), size=pieces - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [total]]))
    return {f"layer{i:02d}.weight": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}


def config(num_clients: int, rate: float, rounds: int) -> ExperimentConfig:
    clients = ClientsConfig(num_clients=num_clients, sampling_rate=rate, work="noop", max_actors=ACTORS)
    return ExperimentConfig(name="overhead", rounds=rounds, clients=clients)


def private_bytes() -> tuple[int, int]:
    mem = psutil.Process().memory_info()
    return mem.rss, mem.rss - mem.shared


def fedsim_side(num_clients: int, rate: float, rounds: int) -> tuple[float, int, list[tuple[int, int]]]:
    """(timed seconds, client-rounds, [(rss, private) after each timed round])."""
    cfg = config(num_clients, rate, rounds)
    strategy = build_strategy(cfg)
    profile = ProfileAssignment.from_config(cfg.clients).pool_profile()
    cfg_dict = cfg.model_dump(mode="json")

    def new_actor(node: str | None):
        return ClientActor.options(**actor_options(profile)).remote(cfg_dict, None, None, 1)

    pool = ClientPool(new_actor, [None] * ACTORS)
    # noop clients never open their shard; one entry serves every id (modulo)
    phase = ClientPhase(cfg, strategy, ShardIndex([Shard("unused", "none", 1)]), 320, pool)
    state = model_state()
    try:
        outcome = phase.run(0, state)  # warm-up
        state = strategy.aggregate(state, outcome.kept, 0)
        del outcome
        seconds, jobs, memory = 0.0, 0, []
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            outcome = phase.run(rnd, state)
            state = strategy.aggregate(state, outcome.kept, rnd)
            jobs += len(outcome.jobs)
            assert len(outcome.kept) == len(outcome.jobs), outcome.failures[:1]
            del outcome  # as in Simulation._one_round: a round's results die with it
            seconds += time.perf_counter() - t0
            memory.append(private_bytes())
        return seconds, jobs, memory
    finally:
        pool.close()


def sample_weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """FedAvg's arithmetic (float64 accumulation of w_i * x_i), written out for the bare loop."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {
        k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states, strict=True)).astype(v.dtype)
        for k, v in states[0].items()
    }


def plain_mean(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        k: (sum(s[k].astype(np.float64) for s in states) / len(states)).astype(v.dtype) for k, v in states[0].items()
    }


def aggregation_cost(clients: int) -> tuple[float, float]:
    """Seconds to average ``clients`` states: FedAvg's weighted mean vs an unweighted one."""
    from strategies.base import weighted_average

    states = [model_state()] * clients
    t0 = time.perf_counter()
    weighted_average(states, [1.0] * clients)
    t1 = time.perf_counter()
    plain_mean(states)
    return t1 - t0, time.perf_counter() - t1


@ray.remote(num_cpus=1)
class Echo:
    def run(self, client_id: int, state: dict) -> tuple[int, dict]:
        return client_id, dict(state)

    def ready(self) -> bool:
        return True


def actorpool_side(num_clients: int, rate: float, rounds: int) -> tuple[float, int]:
    actors = [Echo.remote() for _ in range(ACTORS)]
    ray.get([a.ready.remote() for a in actors])
    pool = ActorPool(actors)
    state = model_state()
    per_round = clients_per_round(rate, num_clients)

    def one_round(rnd: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([0, rnd])
        ref = ray.put(state)
        for cid in sorted(rng.choice(num_clients, size=per_round, replace=False)):
            pool.submit(lambda a, c: a.run.remote(int(c), ref), cid)
        updates = []
        while pool.has_next():
            updates.append(pool.get_next_unordered()[1])
        return sample_weighted_mean(updates, [1.0] * len(updates))

    try:
        state = one_round(0, state)  # warm-up
        seconds = 0.0
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            state = one_round(rnd, state)
            seconds += time.perf_counter() - t0
        return seconds, rounds * per_round
    finally:
        for a in actors:
            ray.kill(a)


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    init_ray()
    print(f"model: {PARAMS / 1e6:.1f}M float32 ({PARAMS * 4 / 2**20:.1f} MiB); {ACTORS} actors; {args.rounds} rounds")
    for n in (100, 1000):
        _, jobs, memory = fedsim_side(n, 0.05, args.rounds)
        (rss1, priv1), (rss_n, priv_n) = memory[0], memory[-1]
        print(
            f"driver memory N={n:<4} 5% ({jobs // args.rounds}/round): RSS round 1 {mib(rss1)}, round {args.rounds} "
            f"{mib(rss_n)} ({rss_n / rss1 - 1:+.1%}); private {mib(priv1)} -> {mib(priv_n)} ({priv_n / priv1 - 1:+.1%})"
        )
    ratio = float("nan")
    for n in (10, 100):
        best = {"fedsim": float("inf"), "actorpool": float("inf")}
        for rep in range(args.repeats):
            order = ("fedsim", "actorpool") if rep % 2 == 0 else ("actorpool", "fedsim")
            for side in order:
                if side == "fedsim":
                    seconds, jobs, _ = fedsim_side(n, 1.0, args.rounds)
                else:
                    seconds, jobs = actorpool_side(n, 1.0, args.rounds)
                per = seconds / jobs
                best[side] = min(best[side], per)
                print(f"N={n:<4} {side:<9} try {rep + 1}: {per * 1e3:7.2f} ms per client-round ({jobs} client-rounds)")
        ratio = best["fedsim"] / best["actorpool"]
        print(
            f"N={n:<4} best: fedsim {best['fedsim']:.4f} s, actorpool {best['actorpool']:.4f} s per client-round"
            f"  (ratio {ratio:.2f})"
        )
    weighted, plain = aggregation_cost(100)
    print(
        f"aggregation of 100 clients: FedAvg weighted mean {weighted:.3f} s, plain mean {plain:.3f} s "
        "(both sides above use the weighted one)"
    )
    ray.shutdown()
    print(f"overhead ratio fedsim/actorpool = {ratio:.2f}")


if __name__ == "__main__":
    main()
