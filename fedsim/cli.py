"""``fedsim run | check | table | data | pretrain | sweep | compare | ui``: the command line.

Parses arguments, calls the application layer (``fedsim.experiment``, ``fedsim.preflight``,
``fedsim.table``, ``sweeps``, ``dashboards``) and maps its exceptions to exit codes. No module
imports this one. Heavy imports stay inside the commands, so ``fedsim --help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsim.config import ExperimentConfig


def _fail(message: str, code: int = 2) -> int:
    print(message, file=sys.stderr)
    return code


def _load(args) -> ExperimentConfig:
    """The config of a command (``--config`` or positional), with its notes printed."""
    from fedsim.preflight import load

    notes: list[str] = []
    cfg = load(args.config, args.set, notes)
    for note in notes:
        print(f"fedsim: {note}", flush=True)
    return cfg


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the application's exceptions to one message and an exit code (2: bad input, 1: failed run)."""

    def run(args: argparse.Namespace) -> int:
        from fedsim.config import ConfigError
        from fedsim.data.conversion import ConversionError
        from fedsim.data.yolo_folder import DataError
        from fedsim.experiment import RunFailed
        from fedsim.preflight import CheckFailed
        from fedsim.runtime.nodes import StorageUnreachable

        try:
            return command(args)
        except (ConfigError, CheckFailed, StorageUnreachable) as exc:
            return _fail(str(exc))
        except (DataError, ConversionError) as exc:
            return _fail(f"fedsim: data error: {exc}")
        except RunFailed as exc:
            return _fail(str(exc), code=1)

    return run


def cmd_check(args) -> int:
    from fedsim.preflight import check

    report = check(_load(args))
    for line in report.summary:
        print(line)
    if report.problems:
        return _fail("\n".join(f"fedsim: check: {p}" for p in report.problems))
    print("check: ok, the run would start")
    return 0


def cmd_run(args) -> int:
    from fedsim.experiment import simulate
    from fedsim.preflight import check_or_raise

    cfg = _load(args)
    check_or_raise(cfg)
    simulate(cfg, resume=args.resume, stop_after=args.stop_after, checked=True)
    return 0


def cmd_table(args) -> int:
    from fedsim.config import ConfigError
    from fedsim.table import build_table, missing, run_all, variants_of, write_table
    from fedsim.tracking import resolve_uri

    base = _load(args)
    variants = variants_of(base, args.strategies, args.seeds)
    reference = args.reference.strip() if args.reference else None
    if reference is not None and reference not in variants:
        rows = ", ".join(variants)
        raise ConfigError(f"fedsim: config error: --reference {reference!r} is not one of --strategies: {rows}")
    cfgs = [c for group in variants.values() for c in group]
    uri = resolve_uri(base.tracking.uri)
    todo = missing(cfgs, uri, base.tracking.experiment)
    recorded = len(cfgs) - len(todo)
    if args.recorded_only:
        todo = []
    print(f"table: {recorded} of {len(cfgs)} runs already in MLflow; running {len(todo)}", flush=True)
    run_all(todo, args.parallel or max(1, (os.cpu_count() or 2) // 2))
    domains = base.data.server_domains + base.data.client_domains
    table = build_table(uri, base.tracking.experiment, variants, domains, reference)
    command = "fedsim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["table"] else None
    print(write_table(table, Path(args.out), domains, f"{Path(args.config).stem}, {args.seeds} seeds", command))
    return 0


def cmd_pretrain(args) -> int:
    from fedsim.config import ExperimentConfig
    from fedsim.experiment import prepare_weights

    cfg = _load(args) if args.config else ExperimentConfig()
    cfg.model.weights = "foundation"
    print(prepare_weights(cfg))
    return 0


def cmd_data(args) -> int:
    if args.kind == "synth":
        from fedsim.config import ExperimentConfig
        from fedsim.data.synthetic_format import prepare

        cfg = _load(args) if args.config else ExperimentConfig()
        part = prepare(cfg.data, cfg.clients.num_clients, Path(args.out).resolve())
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

    chk = sub.add_parser("check", help="verify config, data, weights and device profiles without starting Ray")
    chk.add_argument("config")
    chk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    chk.set_defaults(func=cmd_check)

    table = sub.add_parser("table", help="run missing (strategy, seed) pairs, then tabulate them from MLflow")
    table.add_argument("--config", required=True)
    table.add_argument(
        "--strategies",
        required=True,
        help="e.g. server_only,fedavg,fedmox; with params: 'fedavg;fedmox:alpha=0,num_experts=4' (then ; "
        "separates); a dotted key overrides the config for that row: 'server_only;fedavg:train.conf_thres=0.4'",
    )
    table.add_argument("--seeds", type=int, default=5, help="seeds 0..n-1 per strategy (paired across rows)")
    table.add_argument("--out", required=True)
    table.add_argument("--parallel", type=int, default=None, help="simulations at once (default: cores / 2)")
    table.add_argument("--set", action="append", default=[])
    table.add_argument("--recorded-only", action="store_true", help="run nothing; tabulate what MLflow holds")
    table.add_argument(
        "--reference",
        default=None,
        metavar="SPEC",
        help="one of --strategies: add each other row's paired Δ total mAP@50 vs it, with a 95%% CI over shared seeds",
    )
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
    return _guarded(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
