"""``fedsim compare`` and ``fedsim ui``: argparse wiring only (MLflow and matplotlib load on use)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_compare(args: argparse.Namespace) -> int:
    from dashboards.compare import build_report

    try:
        path = build_report(args.experiment, Path(args.out), tracking_uri=args.tracking_uri, filter_string=args.filter)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}\ntables: {path.with_name('runs.csv')}, {path.with_name('curves.csv')}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from dashboards.ui import launch_ui

    proc = launch_ui(args.tracking_uri, port=args.port)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


def add_parsers(subparsers) -> None:
    cmp = subparsers.add_parser("compare", help="HTML report comparing the MLflow runs of an experiment")
    cmp.add_argument("--experiment", required=True, help="MLflow experiment name")
    cmp.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.strategy = 'fedavg'\"")
    cmp.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db"
    )
    cmp.add_argument("--out", required=True, help="directory for report.html, runs.csv, curves.csv")
    cmp.set_defaults(func=cmd_compare)

    ui = subparsers.add_parser("ui", help="start the MLflow UI on 127.0.0.1 (Ctrl-C stops it)")
    ui.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
