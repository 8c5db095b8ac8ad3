import pandas as pd
import pytest

import fedsim.table
from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.preflight import load
from fedsim.stats import format_diff, paired_difference
from fedsim.table import build_table, variants_of, write_table
from tests.conftest import TINY

DOMAINS = ["cloudy", "rainy", "snowy"]
FEDAVG = {0: 0.50, 1: 0.52, 2: 0.47}
SERVER = {0: 0.48, 1: 0.49, 2: 0.46}
COMMIT_A, COMMIT_B = "abcdef0123456789abcdef0123456789abcdef01", "1234567890abcdef1234567890abcdef12345678"
DELTA = "Δ total vs server_only (95% CI)"
PLATFORMS = ["Xeon A; torch 2.14.1, opencv-python 5.1", "Xeon B; torch 2.14.1, opencv-python 5.0"]


@pytest.fixture
def variants():
    return variants_of(load(str(TINY), [], []), "server_only,fedavg,fedprox", 3)


@pytest.fixture
def fake_runs(monkeypatch, variants):
    rows = []
    for label, totals, commits in [
        ("server_only", SERVER, [COMMIT_A] * 3),
        ("fedavg", FEDAVG, [COMMIT_B, COMMIT_A, COMMIT_B]),
        ("fedprox", {1: 0.40}, [None]),  # one shared seed only; its run predates the git_commit tag
    ]:
        for (seed, total), commit in zip(totals.items(), commits, strict=True):
            rows.append(
                {
                    "tags.config_key": variants[label][seed].key(),
                    "tags.strategy": label,
                    "tags.seed": str(seed),
                    "tags.git_commit": commit,
                    "tags.platform": PLATFORMS[seed % 2] if commit else None,
                    **{f"metrics.map50/{d}": total + 0.01 * i for i, d in enumerate(DOMAINS)},
                    "metrics.map50/total": total,
                }
            )
    # another experiment's run (not one of the table's configs), and the rows out of seed order
    rows.append({**rows[0], "tags.config_key": "elsewhere", "metrics.map50/total": 0.99, "tags.git_commit": "f" * 40})
    runs = pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)
    monkeypatch.setattr(fedsim.table, "recorded_runs", lambda uri, experiment: runs)
    return runs


def test_delta_column_is_the_paired_difference_by_seed(fake_runs, variants, tmp_path):
    table = build_table("sqlite:///unused.db", "tiny", variants, DOMAINS, reference="server_only").set_index("strategy")
    seeds = [0, 1, 2]
    expected = format_diff(paired_difference([FEDAVG[s] for s in seeds], [SERVER[s] for s in seeds]))
    # by hand: differences 0.02, 0.03, 0.01 -> mean 0.02, sd 0.01, t(0.975, 2 dof) = 4.302652729911275
    half = 4.302652729911275 * 0.01 / 3**0.5
    assert expected == f"{0.02:+.3f} [{0.02 - half:+.3f}, {0.02 + half:+.3f}]" == "+0.020 [-0.005, +0.045]"
    assert table.loc["fedavg", DELTA] == expected
    assert table.loc["server_only", DELTA] == "reference"
    assert table.loc["fedprox", DELTA] == "n/a"
    assert table.loc["fedavg", "commit"] == "1234567,abcdef0"
    assert table.loc["server_only", "commit"] == "abcdef0"
    assert table.loc["fedprox", "commit"] == ""
    assert table.loc["fedavg", "total_mean"] == pytest.approx(sum(FEDAVG.values()) / 3)

    md = write_table(table.reset_index(), tmp_path, DOMAINS, "tiny, 3 seeds")
    assert f"| strategy | cloudy | rainy | snowy | total | {DELTA} | seeds | commit |" in md
    assert "| 0.497 ± 0.021 | +0.020 [-0.005, +0.045] | 0,1,2 | 1234567,abcdef0 |" in md
    assert (tmp_path / "table.md").read_text() == md
    assert table.loc["server_only", "platform"] == " || ".join(sorted(PLATFORMS))
    assert table.loc["fedprox", "platform"] == ""
    for stamp in PLATFORMS:  # each distinct platform once, whole, in the header
        assert md.count(f"Ran on: {stamp}\n") == 1
    assert pd.read_csv(tmp_path / "table.csv", keep_default_na=False)[DELTA].tolist() == ["reference", expected, "n/a"]


def test_without_reference_only_the_commit_column_is_added(fake_runs, variants, tmp_path):
    table = build_table("sqlite:///unused.db", "tiny", variants, DOMAINS)
    assert not [c for c in table.columns if c.startswith("Δ")]
    md = write_table(table, tmp_path, DOMAINS, "tiny")
    assert "| strategy | cloudy | rainy | snowy | total | seeds | commit |" in md
    with pytest.raises(ValueError, match="not one of the table's rows"):
        build_table("sqlite:///unused.db", "tiny", variants, DOMAINS, reference="fedmox")


def test_cli_rejects_a_reference_outside_the_strategies_before_running(tmp_path, capsys):
    code = main(
        ["table", "--config", str(TINY), "--strategies", "server_only,fedavg", "--out", str(tmp_path)]
        + ["--reference", "fedmox"]
    )
    assert code == 2
    assert "--reference 'fedmox' is not one of --strategies: server_only, fedavg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_row_spec_with_a_dotted_key_overrides_that_rows_config_only():
    base = load(str(TINY), [], [])
    rows = variants_of(base, "fedavg;fedavg:train.conf_thres=0.4;fedmox:alpha=0,train.client_lr=1e-4", 2)
    plain, strict, mox = (rows[label] for label in rows)
    assert [c.train.conf_thres for c in plain] == [base.train.conf_thres] * 2
    assert [c.train.conf_thres for c in strict] == [0.4, 0.4]
    assert [c.seed for c in strict] == [0, 1]
    assert mox[0].strategy.params == {"alpha": 0} and mox[0].train.client_lr == 1e-4
    assert mox[0].train.conf_thres == base.train.conf_thres
    # Strategy params are read as --set reads values: 1e-3 is a number, not YAML 1.1's string.
    assert variants_of(base, "fedprox:mu=1e-3", 1)["fedprox:mu=1e-3"][0].strategy.params == {"mu": 1e-3}
    # Each row is its own (config, seed): MLflow tells the threshold rows apart by their key.
    assert len({c.key() for cfgs in rows.values() for c in cfgs}) == 6
    # A list value keeps its commas, with ';' or ',' between the specs.
    zoom = "fedavg:train.strong_scale=[0.5,1.0],train.conf_thres=0.3"
    both = variants_of(base, f"fedavg;{zoom}", 1)[zoom][0]
    assert (both.train.strong_scale, both.train.conf_thres) == ((0.5, 1.0), 0.3)
    alone = variants_of(base, "server_only,fedavg:train.strong_scale=[0.5,1.0]", 1)
    assert alone["fedavg:train.strong_scale=[0.5,1.0]"][0].train.strong_scale == (0.5, 1.0)


def test_a_row_spec_with_an_unknown_config_key_is_a_config_error():
    with pytest.raises(ConfigError, match="conf_thresh"):
        variants_of(load(str(TINY), [], []), "fedavg;fedavg:train.conf_thresh=0.4", 1)
    with pytest.raises(ConfigError, match="expected key=value"):
        variants_of(load(str(TINY), [], []), "fedavg;fedmox:alpha", 1)


def _recorded(cfg, total: float) -> dict:
    """A fake MLflow row of a run of ``cfg``: its tags, its flat config as params, its mAP@50."""
    params = {f"params.{k}": v for k, v in cfg.flat().items()}
    scores = {f"metrics.map50/{d}": total for d in [*DOMAINS, "total"]}
    return {
        "tags.config_key": cfg.key(),
        "tags.strategy": cfg.strategy.name,
        "tags.seed": str(cfg.seed),
        **params,
        **scores,
    }


def test_a_baseline_without_clients_reuses_runs_that_differ_only_in_client_side_settings(monkeypatch):
    base = load(str(TINY), [], [])
    client_side = [
        "train.client_lr=0.001",
        "train.box_thres=1.0",
        "compression.uplink=int8",
        "clients.sampling_rate=0.5",
    ]
    recorded = variants_of(base, "server_only;oracle;fedavg", 1)
    rows = [_recorded(cfgs[0], total) for cfgs, total in zip(recorded.values(), (0.4, 0.6, 0.5), strict=True)]
    # train.lr changed as well: a baseline reads it, so that run is not reused
    rows.append(_recorded(variants_of(load(str(TINY), ["train.lr=0.001"]), "scl_frozen", 1)["scl_frozen"][0], 0.45))
    # a run logged before a setting it reads existed (server_scale) lacks its param: never matched
    older = _recorded(variants_of(base, "scl_full", 1)["scl_full"][0], 0.3)
    del older["params.train.server_scale"]
    runs = pd.DataFrame([*rows, older])
    monkeypatch.setattr(fedsim.table, "recorded_runs", lambda uri, experiment: runs)

    wanted = variants_of(load(str(TINY), client_side), "server_only;oracle;fedavg;scl_frozen;scl_full", 1)
    assert not {cfgs[0].key() for cfgs in wanted.values()} & set(runs["tags.config_key"])  # no key matches
    todo = fedsim.table.missing([c for cfgs in wanted.values() for c in cfgs], "sqlite:///unused.db", "tiny")
    assert [c.strategy.name for c in todo] == ["fedavg", "scl_frozen", "scl_full"]  # fedavg trains clients
    table = build_table("sqlite:///unused.db", "tiny", wanted, DOMAINS).set_index("strategy")
    assert table.loc["server_only", "total_mean"] == 0.4 and table.loc["oracle", "total_mean"] == 0.6
    assert table.loc[["fedavg", "scl_frozen", "scl_full"], "seeds"].tolist() == ["", "", ""]
