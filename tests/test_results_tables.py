"""The committed tables name commands that regenerate them (``benchmarks/tables.py``)."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from fedsim.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("results_tables", REPO / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tables  # dataclasses look their module up there
_spec.loader.exec_module(tables)


def test_every_committed_table_names_a_command_that_writes_it_back_in_place():
    found = tables.find_tables()
    assert {"synth_n3", "synth_n9", "compression", "privacy", "previous_recipe/ablation"} <= {t.name for t in found}
    for t in found:
        assert t.is_fedsim_table or (t.argv[0] == "python" and t.argv[1].startswith("benchmarks/")), t.name
        assert t.argv[t.argv.index("--out") + 1] == f"benchmarks/results/{t.name}", t.name
        assert Path(tables.executable(t.argv)[0]).parent == Path(sys.executable).parent


def test_the_results_readme_shows_each_fedsim_tables_own_command():
    # A reader copies the README's command; it must be the one the table names, --set for --set.
    readme = (REPO / "benchmarks" / "results" / "README.md").read_text()
    shown = [shlex.split(block.replace("\\\n", " ")) for block in re.findall(r"```bash\n(.*?)```", readme, re.S)]
    for t in tables.find_tables():
        if not t.is_fedsim_table:
            continue
        out = f"benchmarks/results/{t.name}"
        mine = [argv for argv in shown if "--out" in argv and argv[argv.index("--out") + 1] == out]
        assert mine, f"no command block in benchmarks/results/README.md writes {out}"
        assert _table_options(mine[0]) == _table_options(t.argv), (t.name, shlex.join(mine[0]), shlex.join(t.argv))


def _table_options(argv: list[str]) -> dict:
    """``fedsim table`` options as fedsim's own parser reads them; ``--recorded-only`` aside."""
    options = vars(build_parser().parse_args(argv[1:]))
    options.pop("recorded_only")
    return options


def test_a_table_without_a_command_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "table.md").write_text("### x\n\n| strategy | total |\n")
    (tmp_path / "archive" / "old").mkdir(parents=True)
    (tmp_path / "archive" / "old" / "table.md").write_text("no command either, but archived")
    with pytest.raises(SystemExit, match="names no command"):
        tables.find_tables(tmp_path)
    (tmp_path / "x" / "table.md").write_text("Produced by `fedsim table --config c.yaml --out elsewhere`, from ...")
    [only] = tables.find_tables(tmp_path)
    assert only.name == "x" and only.is_fedsim_table
    assert tables.recorded_only(tables.with_out(only.argv, tmp_path / "t"))[-3:] == [
        "--out",
        str(tmp_path / "t"),
        "--recorded-only",
    ]


def test_a_changed_figure_differs_and_a_reordered_sum_does_not(tmp_path):
    head = "strategy,total,total_mean,commit\n"
    (tmp_path / "a.csv").write_text(head + "fedavg,0.525 ± 0.003,0.5252774960208633,abc\n")
    (tmp_path / "b.csv").write_text(head + "fedavg,0.525 ± 0.003,0.5252774960208634,abc\n")
    (tmp_path / "c.csv").write_text(head + "fedavg,0.526 ± 0.003,0.5262774960208633,abc\n")
    assert tables.differences(tmp_path / "a.csv", tmp_path / "b.csv") == []
    assert tables.differences(tmp_path / "a.csv", tmp_path / "c.csv") == [
        "fedavg: total '0.525 ± 0.003' -> '0.526 ± 0.003'",
        "fedavg: total_mean '0.5252774960208633' -> '0.5262774960208633'",
    ]
