"""``fedsim run | data | pretrain`` — the command line. Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path


class RunFailed(RuntimeError):
    """A simulation that stopped with an error (its finished rounds are kept)."""


def _fail(message: str, code: int = 2) -> int:
    print(message, file=sys.stderr)
    return code


def prepare_data(cfg):
    """The PSSFL partition for ``cfg.data`` (generated or read, then split; cached)."""
    from fedsim.data.partition import build_partition, synthetic_partition
    from fedsim.offline import cache_dir

    data = cfg.data
    if data.format == "synthetic":
        return synthetic_partition(data, cfg.clients.num_clients, cache_dir())
    from fedsim.data.yolo_folder import load_domain_index

    index = load_domain_index(data.root, manifest=data.manifest, num_classes=len(data.classes), on_bad=data.on_bad)
    if index.problems:
        print(f"data: skipped {len(index.problems)} image(s) with problems:\n{index.summary()}", flush=True)
    # The cache key follows the files themselves, so an edited data set is split anew.
    files = sorted(p for images in index.images.values() for p in images)
    fingerprint = hashlib.sha1("".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
    return build_partition(
        index.images,
        data.classes,
        cache_dir(),
        data.server_domains,
        data.client_domains,
        cfg.clients.num_clients,
        data.server_images,
        data.client_images,
        data.test_images,
        data.client_scale,
        data.seed,
        source_key=f"yolo:{Path(data.root).resolve()}:{fingerprint.hexdigest()[:12]}",
    )


def prepare_weights(cfg) -> str | None:
    """The checkpoint path a run starts from (the cached foundation model is built on first use)."""
    from fedsim.model.foundation import pretrain
    from fedsim.offline import cache_dir

    m = cfg.model
    if m.weights != "foundation":
        return m.weights
    return str(
        pretrain(
            cache_dir(),
            m.arch,
            m.pretrain_images,
            m.pretrain_epochs,
            m.pretrain_seed,
            cfg.data.width,
            cfg.data.height,
            threads=cfg.train.server_threads,
        )
    )


def init_ray() -> None:
    """Join the cluster a job runs on, or start a private local one (never both)."""
    import logging

    import ray

    from fedsim.offline import offline_env

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        # Inside `ray job submit` (or pointed at a cluster): join it; these variables are merged
        # into the job's runtime env so every worker starts offline.
        ray.init(
            address="auto", logging_level=logging.WARNING, runtime_env={"env_vars": _not_in_job_env(offline_env())}
        )
    else:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": offline_env()},
        )


def _not_in_job_env(env: dict[str, str]) -> dict[str, str]:
    """Ray refuses to merge a key the submitted job's runtime env already sets; the job's value wins."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: v for k, v in env.items() if k not in taken}


def _run_dir_base(cfg) -> str:
    return f"{cfg.name}-{cfg.strategy.name}-s{cfg.seed}-{cfg.key()}"


def earlier_run_dir(cfg) -> Path | None:
    """The newest run directory of exactly this config, if one was started before."""
    found = sorted(Path(cfg.output_dir).resolve().glob(f"{_run_dir_base(cfg)}-*"))
    return found[-1] if found else None


def new_run_dir(cfg, resume: bool) -> Path:
    root = Path(cfg.output_dir).resolve()
    if resume:
        found = earlier_run_dir(cfg)
        if found:
            return found
        print(f"resume: no earlier run of this config under {root}; starting a new one", flush=True)
    return root / f"{_run_dir_base(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_round(rec: dict, domains: list[str], rounds: int) -> str:
    maps = "  ".join(f"{d} {rec.get(f'map50/{d}', float('nan')):.3f}" for d in domains)
    label = "warm-up" if rec["round"] == 0 else f"round {rec['round']}/{rounds}"
    extra = f"  clients {int(rec['clients/ok'])} ok" if "clients/ok" in rec else ""
    for fate in ("failed", "stragglers"):
        if rec.get(f"clients/{fate}"):
            extra += f" {int(rec[f'clients/{fate}'])} {fate}"
    return f"{label:<12} mAP@50 {maps}  total {rec['map50/total']:.3f}{extra}  {rec['round_seconds']:.1f}s"


def simulate(
    cfg, resume: bool = False, stop_after: int | None = None, echo=print, pool_size: int | None = None
) -> dict:
    """Run one simulation to the end (or to ``stop_after`` rounds); returns the last record."""
    import ray

    from fedsim.runtime.driver import DriverActor
    from fedsim.tracking import resolve_uri

    partition = prepare_data(cfg)
    weights = prepare_weights(cfg)
    run_dir = new_run_dir(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(cfg.tracking.uri)
    init_ray()
    domains = list(partition.test)
    driver = DriverActor.options(num_cpus=0).remote(
        cfg.model_dump(mode="json"), str(run_dir), str(partition.root), weights, uri, resume, stop_after, pool_size
    )
    last: dict = {}
    for ref in driver.run.remote():
        try:
            rec = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise RunFailed(f"fedsim: run failed: {exc.cause if exc.cause else exc}") from exc
        if rec["event"] == "round":
            echo(format_round(rec, domains, cfg.rounds))
            last = rec
        elif rec["event"] == "resumed":
            echo(f"resumed {run_dir.name} after round {rec['round']}")
        elif rec["event"] == "stopped":
            echo(f"stopped after round {rec['round']} (--stop-after); continue with --resume")
        elif rec["event"] == "done":
            echo(f"done: {run_dir}  (MLflow run {rec['run_id']} at {uri})")
            last = {**last, **rec}
    return last


def cmd_run(args) -> int:
    from fedsim.config import ConfigError, load

    try:
        cfg = load(args.config, args.set)
    except ConfigError as exc:
        return _fail(str(exc))
    from fedsim.data.yolo_folder import DataError

    try:
        simulate(cfg, resume=args.resume, stop_after=args.stop_after)
    except DataError as exc:  # bad data found while preparing, before Ray starts
        return _fail(f"fedsim: data error: {exc}")
    except RunFailed as exc:
        return _fail(str(exc), code=1)
    return 0


def cmd_table(args) -> int:
    from fedsim.config import ConfigError, load
    from fedsim.table import build_table, missing, run_all, variant, write_table
    from fedsim.tracking import resolve_uri

    try:
        base = load(args.config, args.set)
        specs = [s.strip() for s in args.strategies.split(";" if ";" in args.strategies else ",")]
        variants = {spec: [variant(base, spec, seed) for seed in range(args.seeds)] for spec in specs}
        cfgs = [c for group in variants.values() for c in group]
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    uri = resolve_uri(base.tracking.uri)
    todo = missing(cfgs, uri, base.tracking.experiment)
    recorded = len(cfgs) - len(todo)
    if args.recorded_only:
        todo = []
    print(f"table: {recorded} of {len(cfgs)} runs already in MLflow; running {len(todo)}", flush=True)
    parallel = args.parallel or max(1, (os.cpu_count() or 2) // 2)
    try:
        run_all(todo, parallel)
    except RunFailed as exc:
        return _fail(str(exc), code=1)
    domains = base.data.server_domains + base.data.client_domains
    table = build_table(uri, base.tracking.experiment, variants, domains)
    print(write_table(table, Path(args.out), domains, f"{Path(args.config).stem}, {args.seeds} seeds"))
    return 0


def cmd_pretrain(args) -> int:
    from fedsim.config import ConfigError, ExperimentConfig, load

    try:
        cfg = load(args.config, args.set) if args.config else ExperimentConfig()
    except ConfigError as exc:
        return _fail(str(exc))
    cfg.model.weights = "foundation"
    print(prepare_weights(cfg))
    return 0


def cmd_data(args) -> int:
    if args.kind == "synth":
        from fedsim.config import ConfigError, ExperimentConfig, load
        from fedsim.data.partition import synthetic_partition

        try:
            cfg = load(args.config, args.set) if args.config else ExperimentConfig()
        except ConfigError as exc:
            return _fail(str(exc))
        part = synthetic_partition(cfg.data, cfg.clients.num_clients, Path(args.out).resolve())
        print(f"{part.root}\n  server: {part.server_images} (imgsz {part.server_imgsz})")
        for c in part.clients:
            print(f"  client {c.client_id}: {c.domain}, {c.num_images} images (imgsz {part.client_imgsz})")
        print(f"  data.yaml: {part.root / 'data.yaml'}")
        return 0
    if args.kind == "bdd100k":
        from fedsim.data.bdd100k import convert_bdd100k

        report = convert_bdd100k(Path(args.labels), Path(args.images), Path(args.out), domain_key=args.domain_key)
    else:
        from fedsim.data.soda10m import convert_soda10m

        report = convert_soda10m(Path(args.annotations), Path(args.images), Path(args.out), domain_key=args.domain_key)
    print(report.summary())
    for label, names in (("missing", report.missing_images), ("unreadable", report.unreadable_images)):
        if names:
            print(f"{label} images ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim", description="PSSFL simulation of detection foundation models on Ray"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one simulation")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    run.add_argument("--resume", action="store_true", help="continue the latest run of this config")
    run.add_argument("--stop-after", type=int, default=None, help="stop after this round (testing resume)")
    run.set_defaults(func=cmd_run)

    table = sub.add_parser("table", help="run missing (strategy, seed) pairs, then tabulate them from MLflow")
    table.add_argument("--config", required=True)
    table.add_argument(
        "--strategies",
        required=True,
        help="e.g. server_only,fedavg,fedmox; with params: 'fedavg;fedmox:alpha=0,num_experts=4' (then ; separates)",
    )
    table.add_argument("--seeds", type=int, default=3)
    table.add_argument("--out", required=True)
    table.add_argument("--parallel", type=int, default=None, help="simulations at once (default: cores / 2)")
    table.add_argument("--set", action="append", default=[])
    table.add_argument("--recorded-only", action="store_true", help="run nothing; tabulate what MLflow holds")
    table.set_defaults(func=cmd_table)

    pre = sub.add_parser("pretrain", help="build (or find) the cached foundation checkpoint")
    pre.add_argument("--config", default=None)
    pre.add_argument("--set", action="append", default=[])
    pre.set_defaults(func=cmd_pretrain)

    data = sub.add_parser("data", help="generate the synthetic data set or convert real data")
    kinds = data.add_subparsers(dest="kind", required=True)
    synth = kinds.add_parser("synth", help="generate and split the embedded default data set")
    synth.add_argument("--out", required=True)
    synth.add_argument("--config", default=None)
    synth.add_argument("--set", action="append", default=[])
    bdd = kinds.add_parser("bdd100k", help="BDD100K detection JSON -> domain folders")
    bdd.add_argument("--labels", required=True)
    bdd.add_argument("--images", required=True)
    bdd.add_argument("--out", required=True)
    bdd.add_argument("--domain-key", default="weather", choices=["weather", "timeofday", "scene"])
    soda = kinds.add_parser("soda10m", help="SODA10M COCO-style JSON -> domain folders")
    soda.add_argument("--annotations", required=True)
    soda.add_argument("--images", required=True)
    soda.add_argument("--out", required=True)
    soda.add_argument("--domain-key", default="weather", choices=["weather", "period", "location", "city"])
    data.set_defaults(func=cmd_data)
    from dashboards.cli import add_parsers as add_dashboards
    from sweeps.cli import add_parser as add_sweep

    add_sweep(sub)
    add_dashboards(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
