"""What client-level DP costs in mAP: one config without DP and with DP-FedAvg at target epsilons.

    python benchmarks/privacy.py --config configs/synth_dp.yaml --epsilons 1,4,8 \\
        --out benchmarks/results/privacy                                 # also writes table.md

For each target epsilon (at the config's ``privacy.delta``), the noise multiplier sigma is
calibrated with the accountant (``fedsim.privacy.calibrate_noise``: ``dp_accounting``'s
``calibrate_dp_mechanism`` over the RDP accountant) for the config's sampling rate q = m / N and
its number of rounds. Every run has the same seed, data, clients sampled and clipping bound; the
runs differ only in sigma (and the no-DP run has no clipping either). The clipping bound is
``--clip-norm``, or, without it, the median L2 norm of the privatised entries of a few clients'
round-1 updates from the foundation model (``--probe`` clients, run in this process as a client
actor would; Andrew et al. 2021 adapt the bound to such a quantile during training, here it is
fixed before the runs). The warm-up (round 0) does not depend on privacy, so it runs once: the DP
runs resume from the no-DP run's round-0 checkpoint (``--resume`` semantics, the same rounds as an
uninterrupted run); their ``run s`` exclude the warm-up.

The table has, per row: sigma, the epsilon the run logged after its last round (``privacy/epsilon``,
RDP) and PLD's epsilon for the same (q, sigma, rounds), the per-coordinate noise std on the mean
update (sigma * C / m), the fraction of client updates the bound clipped, the final mAP@50 (total)
and its difference from the no-DP run. One seed: the Δ column shows the size of the effect, not
a significance test. ``--out`` stamps the table with the command, the git commit and the
foundation checkpoint (``name:sha1``, as runs tag it).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import fedsim  # noqa: F401  (offline environment before Ray and Ultralytics)

# isort: split
import numpy as np
import ray
from provenance import command_line, platform_stamp, start_commit, weights_stamp

from fedsim.config import ExperimentConfig, apply_overrides
from fedsim.experiment import init_ray, prepare_data, prepare_weights
from fedsim.model.detector import build_detector, get_state, model_spec
from fedsim.preflight import check_or_raise, load
from fedsim.privacy import calibrate_noise, epsilon, l2_norm, sampling_rate
from fedsim.runtime.client import ClientWorker
from fedsim.runtime.driver import Simulation
from fedsim.runtime.private import privatised_keys
from fedsim.runtime.rounds import ShardIndex
from fedsim.types import ClientJob, ClientResult
from strategies import build as build_strategy


def with_sets(cfg: ExperimentConfig, sets: list[str]) -> ExperimentConfig:
    return ExperimentConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), sets))


def probe_norms(cfg: ExperimentConfig, clients: int) -> list[float]:
    """L2 norms of the privatised deltas of clients 0..clients-1's round-1 updates (foundation model)."""
    partition = prepare_data(cfg, echo=lambda _: None)
    strategy = build_strategy(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes, prepare_weights(cfg)))
    worker = ClientWorker(cfg.model_dump(mode="json"), model_spec(model), get_state(model, list(model.state_dict())), 1)
    received = get_state(model, strategy.state_keys(model))
    shards = ShardIndex.from_partition(partition)
    norms = []
    for cid in range(clients):
        shard = shards.shard(cid)
        job = ClientJob(cid, 1, shard.images, partition.client_imgsz, seed=cid, plan=strategy.client_plan(1))
        result = worker.run(job, received)
        if not isinstance(result, ClientResult):
            raise RuntimeError(f"client {cid}'s probe job failed: {result.error}")
        keys = privatised_keys(result.update, cfg.train.client_bn_stats == "train")
        norms.append(l2_norm({k: result.update[k].astype(np.float64) - received[k] for k in keys}))
    return norms


def run(
    cfg: ExperimentConfig, workdir: Path, uri: str, partition_root: Path, weights: str | None, warm: Path | None
) -> dict:
    """One run; with ``warm`` (a round-0 checkpoint), resumed after that warm-up instead of its own."""
    (workdir / "checkpoints").mkdir(parents=True)
    if warm is not None:
        shutil.copy(warm, workdir / "checkpoints" / warm.name)
    t0 = time.perf_counter()
    records = list(Simulation(cfg, workdir, partition_root, weights, uri, resume=warm is not None).run())
    rounds = [r for r in records if r.get("event") == "round" and r["round"] > 0]
    if len(rounds) != cfg.rounds:
        raise RuntimeError(f"{workdir.name}: {len(rounds)} of {cfg.rounds} rounds ran")
    clipped = [r["privacy/clipped_fraction"] for r in rounds if "privacy/clipped_fraction" in r]
    return {
        "map50": rounds[-1]["map50/total"],
        "logged_epsilon": rounds[-1].get("privacy/epsilon", float("nan")),
        "clipped": float(np.mean(clipped)) if clipped else float("nan"),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/synth_dp.yaml")
    ap.add_argument("--epsilons", default="1,4,8", help="comma-separated target epsilons (RDP, at privacy.delta)")
    ap.add_argument("--clip-norm", type=float, help="fixed clipping bound C (default: median of the probe norms)")
    ap.add_argument("--probe", type=int, default=5, help="probe clients setting C (no --clip-norm)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", type=Path, help="directory for table.md (default: print only)")
    args = ap.parse_args()
    start_commit()  # the tree as it starts

    base = load(args.config, [*args.set, "privacy.clip_norm=null", "privacy.noise_multiplier=0"])
    q = sampling_rate(base.clients.per_round, base.clients.num_clients)
    delta, rounds, m = base.privacy.delta, base.rounds, base.clients.per_round
    n = base.clients.num_clients
    print(f"{base.name}: {base.strategy.name}, N={n}, m={m} (q={q:g}), {rounds} rounds, δ={delta:g}")
    norms: list[float] = []
    if args.clip_norm is None:
        norms = probe_norms(base, args.probe)
        clip_norm = float(np.median(norms))
        print(f"probe: round-1 update norms {', '.join(f'{n:.4g}' for n in norms)} -> C = median = {clip_norm:.4g}")
    else:
        clip_norm = args.clip_norm
    targets = [float(e) for e in args.epsilons.split(",") if e.strip()]
    sigmas = {t: calibrate_noise(q, rounds, t, delta) for t in targets}
    for t, s in sigmas.items():
        print(f"target ε={t:g}: σ={s:.4f} (RDP ε {epsilon(q, s, rounds, delta):.3f})")

    variants = {"no DP": base}
    for t, s in sigmas.items():
        variants[f"ε={t:g}"] = with_sets(base, [f"privacy.clip_norm={clip_norm!r}", f"privacy.noise_multiplier={s!r}"])
    for cfg in variants.values():
        check_or_raise(cfg)
    partition = prepare_data(base, echo=lambda _: None)
    weights = prepare_weights(base)
    init_ray()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for i, (name, cfg) in enumerate(variants.items()):
            workdir = Path(tmp) / f"run{i}"
            warm = Path(tmp) / "run0" / "checkpoints" / "round_0000.pt" if i else None
            results[name] = r = run(cfg, workdir, uri, Path(partition.root), weights, warm)
            print(f"  {name:<8} mAP@50 {r['map50']:.3f}  ε {r['logged_epsilon']:.3f}  {r['seconds']:.0f} s", flush=True)
            if args.out:  # after each run, so a long table keeps what finished
                write_table(args.out, base, clip_norm, norms, sigmas, results)
    ray.shutdown()
    print("\n".join(table(base, clip_norm, sigmas, results)))


def table(base: ExperimentConfig, clip_norm: float, sigmas: dict[float, float], results: dict) -> list[str]:
    q = sampling_rate(base.clients.per_round, base.clients.num_clients)
    delta, rounds, m = base.privacy.delta, base.rounds, base.clients.per_round
    lines = [
        "| run | σ | ε (RDP, logged) | ε (PLD) | noise std on the mean (σC/m) | clipped fraction"
        " | final mAP@50 (total) | Δ vs no DP | run s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = results["no DP"]["map50"]
    lines.append(f"| no DP | — | ∞ | ∞ | — | — | {plain:.3f} | — | {results['no DP']['seconds']:.0f} |")
    for t, s in sigmas.items():
        pld = epsilon(q, s, rounds, delta, "pld")
        head = f"| target ε={t:g} | {s:.4f}"
        r = results.get(f"ε={t:g}")
        if r is None:
            lines.append(f"{head} | not run | {pld:.3f} | {s * clip_norm / m:.3g} | | not run | | |")
            continue
        lines.append(
            f"{head} | {r['logged_epsilon']:.3f} | {pld:.3f} | {s * clip_norm / m:.3g}"
            f" | {r['clipped']:.2f} | {r['map50']:.3f} | {r['map50'] - plain:+.3f} | {r['seconds']:.0f} |"
        )
    return lines


def write_table(
    out: Path, base: ExperimentConfig, clip_norm: float, norms: list[float], sigmas: dict, results: dict
) -> None:
    q = sampling_rate(base.clients.per_round, base.clients.num_clients)
    out.mkdir(parents=True, exist_ok=True)
    how = (
        f"median of {len(norms)} probe clients' round-1 update norms ({', '.join(f'{n:.4g}' for n in norms)})"
        if norms
        else "--clip-norm"
    )
    stamp = [
        f"# Client-level DP-FedAvg on {base.name} ({base.strategy.name}, seed {base.seed})",
        "",
        f"- command: `{command_line()}`",
        f"- commit: {start_commit()} (at the start of the benchmark)",
        f"- foundation checkpoint: {weights_stamp(base)}",
        f"- platform: {platform_stamp()}",
        f"- population: N={base.clients.num_clients} clients, m={base.clients.per_round} per round (q={q:g}),"
        f" {base.rounds} rounds, δ={base.privacy.delta:g}; σ calibrated per target with `calibrate_noise`"
        " (dp_accounting, RDP)",
        f"- clip norm C = {clip_norm:.4g} ({how}), the same for every DP run",
        "",
    ]
    (out / "table.md").write_text("\n".join(stamp + table(base, clip_norm, sigmas, results)) + "\n")
    print(f"wrote {out / 'table.md'}", flush=True)


if __name__ == "__main__":
    main()
