"""``fedsim compare`` and ``fedsim ui``: argparse wiring only (MLflow and matplotlib load on use)."""

from __future__ import annotations

import argparse
import signal
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


# SIGHUP too: the server has its own session, so a closed terminal no longer reaches it directly.
UI_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def cmd_ui(args: argparse.Namespace) -> int:
    """Run the MLflow UI until it exits, or until SIGINT/SIGTERM/SIGHUP, which stop it and exit 0.

    The signal is forwarded to the server's process group; a second one kills the group at once.
    """
    from dashboards.ui import launch_ui, stop_ui

    received: list[int] = []
    armed = False  # raise only while waiting: a signal inside Popen would lose the child

    def on_signal(signum: int, frame: object) -> None:
        nonlocal armed
        received.append(signum)
        if armed:
            armed = False
            raise _Stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in UI_STOP_SIGNALS}
    try:
        proc = launch_ui(args.tracking_uri, port=args.port)
        try:
            armed = True
            if received:
                armed = False
                raise _Stop(received[0])
            code = proc.wait()
            armed = False
        except _Stop as stop:
            name = signal.Signals(stop.signum).name
            print(f"fedsim ui: {name}, stopping the MLflow UI (pid {proc.pid})", file=sys.stderr, flush=True)
            stop_ui(proc, stop.signum, hurry=lambda: len(received) > 1)
            return 0
        stop_ui(proc)  # the server exited by itself: stop any worker it left behind
        return code if code >= 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
