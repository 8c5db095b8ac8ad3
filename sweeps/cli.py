"""``fedsim sweep SWEEP_CONFIG [--resume]``: argparse wiring only (Ray and Tune load on use)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.config import ConfigError
    from sweeps.config import SweepConfigError
    from sweeps.tune import run_sweep

    try:
        result = run_sweep(Path(args.sweep_config), resume=args.resume)
    except (SweepConfigError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"sweep {result.name} done in {result.seconds:.0f}s: {result.storage} (MLflow parent {result.parent_run_id})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="hyperparameter sweep: Ray Tune + Optuna + ASHA over simulations")
    p.add_argument("sweep_config", metavar="SWEEP_CONFIG", help="sweep YAML (base config, space, scheduler)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials stay")
    p.set_defaults(func=cmd_sweep)
    return p
