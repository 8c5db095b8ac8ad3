"""Regenerate, or check, every committed table under ``benchmarks/results`` from the command it names.

    python benchmarks/tables.py                      # run each table's own command (MLflow's runs reused)
    python benchmarks/tables.py --check              # rebuild the fedsim tables from MLflow alone and compare
    python benchmarks/tables.py --only synth_n3,box_thres --dry-run

A ``fedsim table`` table names its command ("Produced by `...`"); a benchmark script's table names
it on its "command:" line. Regenerating runs each command as it is written, against the MLflow
store in ``MLFLOW_TRACKING_URI`` (default ``runs/mlflow.db``): on a store that holds the runs it
runs nothing and rewrites the tables unchanged; on a fresh one it runs every (config, seed) once,
however many tables share it. ``--check`` rebuilds each ``fedsim table`` table with
``--recorded-only`` into a temporary folder and compares it with the committed ``table.csv``
(benchmark scripts record no runs to rebuild from, so they are listed, not checked).
``archive/`` is left out: its tables came from earlier recipes and machines, and say so.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
_COMMAND = re.compile(r"^(?:Produced by|- command:) `([^`]+)`", re.MULTILINE)


@dataclass
class Table:
    name: str  # its folder under results/
    folder: Path
    argv: list[str]

    @property
    def is_fedsim_table(self) -> bool:
        return self.argv[:2] == ["fedsim", "table"]


def find_tables(root: Path = RESULTS) -> list[Table]:
    """Every ``table.md`` outside ``archive/``, with the command it names (an error if it names none)."""
    tables = []
    for md in sorted(root.rglob("table.md")):
        name = md.parent.relative_to(root).as_posix()
        if name.split("/")[0] == "archive":
            continue
        found = _COMMAND.search(md.read_text())
        if found is None:
            raise SystemExit(f"{md}: names no command that produced it")
        tables.append(Table(name, md.parent, shlex.split(found.group(1))))
    return tables


def with_out(argv: list[str], out: Path) -> list[str]:
    """``argv`` writing to ``out`` instead of its own ``--out``."""
    if "--out" not in argv:
        raise ValueError(f"{shlex.join(argv)}: no --out")
    i = argv.index("--out")
    return [*argv[: i + 1], str(out), *argv[i + 2 :]]


def recorded_only(argv: list[str]) -> list[str]:
    return argv if "--recorded-only" in argv else [*argv, "--recorded-only"]


def executable(argv: list[str]) -> list[str]:
    """``fedsim ...`` and ``python ...`` as this interpreter's environment runs them."""
    if argv[0] == "fedsim":
        return [str(Path(sys.executable).with_name("fedsim")), *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    raise ValueError(f"{shlex.join(argv)}: neither a fedsim nor a python command")


def differences(committed: Path, rebuilt: Path) -> list[str]:
    """The rows of two ``table.csv`` files that differ, as readable lines (empty: identical)."""
    old, new = (pd.read_csv(p, keep_default_na=False, dtype=str) for p in (committed, rebuilt))
    if list(old.columns) != list(new.columns) or len(old) != len(new):
        return [f"columns or rows differ: {list(old.columns)} x {len(old)} vs {list(new.columns)} x {len(new)}"]
    out = []
    for (_, a), (_, b) in zip(old.iterrows(), new.iterrows(), strict=True):
        changed = [c for c in old.columns if not _same(a[c], b[c])]
        out += [f"{a['strategy']}: {c} {a[c]!r} -> {b[c]!r}" for c in changed]
    return out


def _same(a: str, b: str) -> bool:
    """Equal cells; numbers up to the last bits, which the order a mean sums its seeds in moves."""
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return False


def check(table: Table, cwd: Path) -> list[str]:
    """Rebuild a fedsim table from MLflow alone; what differs from the committed one."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = recorded_only(with_out(table.argv, Path(tmp)))
        done = subprocess.run(executable(argv), cwd=cwd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return [f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"]
        return differences(table.folder / "table.csv", Path(tmp) / "table.csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild fedsim tables from MLflow and compare")
    parser.add_argument("--only", help="comma-separated table folders (as under results/, e.g. synth_n3)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tables = find_tables(args.results)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - {t.name for t in tables}
        if unknown:
            parser.error(f"--only: no such table: {', '.join(sorted(unknown))}")
        tables = [t for t in tables if t.name in wanted]
    repo = args.results.parent.parent
    failed = 0
    for table in tables:
        if args.check and not table.is_fedsim_table:
            print(f"{table.name}: not checked (a benchmark script's table; rerun it to compare)", flush=True)
            continue
        print(f"{table.name}: {shlex.join(recorded_only(table.argv) if args.check else table.argv)}", flush=True)
        if args.dry_run:
            continue
        if args.check:
            diff = check(table, repo)
            print(f"  {'identical' if not diff else 'DIFFERS'}", *[f"\n    {d}" for d in diff], flush=True)
            failed += bool(diff)
        else:
            failed += subprocess.run(executable(table.argv), cwd=repo, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
