"""Uplink bytes and what they cost: each ``compression.uplink`` codec side by side, through the real engine.

Two measurements on one config (default ``configs/tiny.yaml``):

1. Codec error on one real client update: the foundation model, one client job run in this process
   (``ClientWorker``, the code a client actor runs), its delta encoded by every codec: bytes sent,
   ratio to the float32 state, relative L2 error of the decoded delta ``|d' - d| / |d|``.
2. Whole runs: every codec in an in-process ``Simulation`` on a private local Ray cluster (the code
   ``fedsim run`` drives): ``bytes_up`` per client per round (what ``ClientTelemetry`` counts: the
   payload's arrays), its ratio to ``none``, and the final round's mAP@50 (total) of that run.
   The warm-up (round 0) does not depend on the codec, so it runs once per strategy: every codec
   after the first resumes from the first run's round-0 checkpoint (``--resume`` semantics, which
   give the same rounds as an uninterrupted run); their ``run s`` exclude the warm-up.

    python benchmarks/compression.py                                   # tiny.yaml, 2 rounds
    python benchmarks/compression.py --config configs/synth_n3.yaml --rounds 6 \
        --strategies fedavg,fedmox --out benchmarks/results/compression  # also writes table.md

``--strategies`` (comma-separated, default: the config's own) repeats both measurements per
strategy, as ``fedsim table --strategies`` would configure it (the config's params are kept for its
own strategy, defaults for the others); Δ is each codec's final mAP@50 minus that strategy's ``none``.

``--out`` writes ``table.md`` stamped with the command, the git commit and the foundation
checkpoint's file name and content hash (``name:sha1``, as runs tag it). One seed, so the mAP
column says whether a codec breaks training, not by how much it differs from ``none`` (use
``fedsim table`` over seeds for that).

Last line per strategy: ``<strategy> bytes ratio vs none: fp16=X int8/tensor=Y int8/channel=Z topk=W``.
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

from fedsim.compression import decode_deltas, encode, is_float
from fedsim.config import CompressionConfig, ExperimentConfig, apply_overrides
from fedsim.experiment import init_ray, prepare_data, prepare_weights
from fedsim.model.detector import build_detector, get_state, model_spec
from fedsim.preflight import load
from fedsim.runtime.client import ClientWorker
from fedsim.runtime.driver import Simulation
from fedsim.runtime.rounds import ShardIndex
from fedsim.table import variant
from fedsim.types import ClientJob, ClientResult
from strategies import build as build_strategy

CODECS = {
    "none": ["compression.uplink=none"],
    "fp16": ["compression.uplink=fp16"],
    "int8/tensor": ["compression.uplink=int8", "compression.int8_granularity=tensor"],
    "int8/channel": ["compression.uplink=int8", "compression.int8_granularity=channel"],
    "topk": ["compression.uplink=topk"],
}


def codec_config(cfg: ExperimentConfig, name: str) -> CompressionConfig:
    return load_with(cfg, CODECS[name]).compression


def load_with(cfg: ExperimentConfig, sets: list[str]) -> ExperimentConfig:
    return ExperimentConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), sets))


def one_client_update(cfg: ExperimentConfig) -> tuple[dict, dict]:
    """(the global state a client receives, the state it sends back) for client 0 in round 1."""
    cfg = load_with(cfg, CODECS["none"])
    partition = prepare_data(cfg, echo=lambda _: None)
    strategy = build_strategy(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes, prepare_weights(cfg)))
    full = get_state(model, list(model.state_dict()))
    worker = ClientWorker(cfg.model_dump(mode="json"), model_spec(model), full, threads=1)
    received = get_state(model, strategy.state_keys(model))
    shard = ShardIndex.from_partition(partition).shard(0)
    job = ClientJob(0, 1, shard.images, partition.client_imgsz, seed=0, plan=strategy.client_plan(1))
    result = worker.run(job, received)
    if not isinstance(result, ClientResult):
        raise RuntimeError(f"the client job failed: {result.error}")
    return received, result.update


def codec_errors(cfg: ExperimentConfig) -> dict[str, dict[str, float]]:
    received, update = one_client_update(cfg)
    floats = [k for k, v in update.items() if is_float(v)]
    true = np.concatenate([(update[k].astype(np.float64) - received[k]).reshape(-1) for k in floats])
    plain = sum(v.nbytes for v in update.values())
    out = {"none": {"bytes": plain, "ratio": 1.0, "error": 0.0}}
    for name in CODECS:
        if name == "none":
            continue
        c = codec_config(cfg, name)
        payload, _ = encode(update, received, c)
        got = decode_deltas(payload, c.int8_granularity == "channel")
        sent = np.concatenate([got[k].astype(np.float64).reshape(-1) for k in floats])
        error = float(np.linalg.norm(sent - true) / max(np.linalg.norm(true), 1e-30))
        out[name] = {"bytes": payload.nbytes, "ratio": payload.nbytes / plain, "error": error}
    return out


def engine_runs(cfg: ExperimentConfig, workdir: Path, codecs: list[str]) -> dict[str, dict[str, float]]:
    init_ray()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    partition = prepare_data(cfg, echo=lambda _: None)
    weights = prepare_weights(cfg)
    out = {}
    warm: Path | None = None
    for name in codecs:
        run_cfg = load_with(cfg, CODECS[name])
        run_dir = workdir / name.replace("/", "-")
        (run_dir / "checkpoints").mkdir(parents=True)
        if warm is not None:  # the warm-up does not depend on the codec: resume after the first run's
            shutil.copy(warm, run_dir / "checkpoints" / warm.name)
        t0 = time.perf_counter()
        sim = Simulation(run_cfg, run_dir, Path(partition.root), weights, uri, resume=warm is not None)
        records = list(sim.run())
        warm = warm or run_dir / "checkpoints" / "round_0000.pt"
        rounds = [r for r in records if r.get("event") == "round" and r["round"] > 0]
        per_client = [r["bytes_up"] / max(r["clients/ok"], 1) for r in rounds]
        out[name] = {
            "bytes_up": float(np.mean(per_client)),
            "map50": rounds[-1]["map50/total"] if rounds else float("nan"),
            "seconds": time.perf_counter() - t0,
        }
        mib = out[name]["bytes_up"] / 2**20
        print(f"  {name:<13} {mib:8.3f} MiB/client/round  {out[name]['seconds']:.0f} s", flush=True)
    return out


def table(results: dict[str, tuple[dict, dict]]) -> list[str]:
    """One row per (strategy, codec); ``results[strategy] = (errors, runs)``."""
    lines = [
        "| strategy | uplink | bytes up / client / round | ratio vs none | rel. L2 error of one update"
        " | final mAP@50 (total) | Δ vs none | run s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy, (errors, runs) in results.items():
        base = runs["none"]
        for name in CODECS:
            e, r = errors[name], runs.get(name)
            if r is None:  # not run through the engine (--codecs): the one-update figures only
                ratio = f"{e['ratio']:.3f} (one update)"
                lines.append(f"| {strategy} | {name} | {e['bytes']:,.0f} (one update) | {ratio} | {e['error']:.2e}"
                             " | not run | | |")  # fmt: skip
                continue
            delta = "—" if name == "none" else f"{r['map50'] - base['map50']:+.3f}"
            lines.append(
                f"| {strategy} | {name} | {r['bytes_up']:,.0f} | {r['bytes_up'] / base['bytes_up']:.3f}"
                f" | {e['error']:.2e} | {r['map50']:.3f} | {delta} | {r['seconds']:.0f} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strategies", help="comma-separated strategy names (default: the config's own)")
    ap.add_argument("--codecs", default=",".join(CODECS), help="uplinks run through the engine (none always)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", type=Path, help="directory for table.md (default: print only)")
    args = ap.parse_args()
    start_commit()  # the tree as it starts
    cfg = load(args.config, [f"rounds={args.rounds}", *args.set])
    names = [n.strip() for n in (args.strategies or cfg.strategy.name).split(",") if n.strip()]
    codecs = ["none", *(c for c in CODECS if c != "none" and c in args.codecs.split(","))]
    results: dict[str, tuple[dict, dict]] = {}
    for name in names:
        scfg = variant(cfg, name, cfg.seed)
        print(f"{scfg.name}: {name}, {scfg.rounds} rounds, {scfg.clients.per_round} clients per round")
        print("codec error on one client update (client 0, round 1, from the foundation model):")
        errors = codec_errors(scfg)
        for codec, e in errors.items():
            print(f"  {codec:<13} {e['bytes']:>12,} B  ratio {e['ratio']:.3f}  rel. L2 error {e['error']:.2e}")
        print("engine runs:")
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = (errors, engine_runs(scfg, Path(tmp), codecs))
        if args.out:  # after each strategy, so a long table keeps what finished
            write_table(args.out, cfg, names, results)
    ray.shutdown()
    print("\n".join(table(results)))
    for name, (_, runs) in results.items():
        base = runs["none"]["bytes_up"]
        ratios = " ".join(f"{n}={runs[n]['bytes_up'] / base:.3f}" for n in codecs if n != "none")
        print(f"{name} bytes ratio vs none: {ratios}")


def write_table(out: Path, cfg: ExperimentConfig, names: list[str], results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if n not in results]
    stamp = [
        f"# Uplink compression on {cfg.name} ({', '.join(names)}; {cfg.rounds} rounds, seed {cfg.seed})",
        "",
        f"- command: `{command_line()}`",
        f"- commit: {start_commit()} (at the start of the benchmark)",
        f"- foundation checkpoint: {weights_stamp(cfg)}",
        f"- platform: {platform_stamp()}",
        f"- topk_fraction {codec_config(cfg, 'topk').topk_fraction}; bytes = the payload arrays' nbytes;"
        " Δ = final mAP@50 (total) minus the same strategy's `none` run (one seed: not a significance test)",
        *([f"- incomplete: {', '.join(missing)} not run yet"] if missing else []),
        "",
    ]
    (out / "table.md").write_text("\n".join(stamp + table(results)) + "\n")
    print(f"wrote {out / 'table.md'}", flush=True)


if __name__ == "__main__":
    main()
