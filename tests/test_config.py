import subprocess

import pytest
import yaml

from fedsim.config import ConfigError, ExperimentConfig
from fedsim.preflight import load, parse
from tests.conftest import REPO, TINY, run_fedsim


def test_every_bad_field_is_named_in_one_error(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["strategy"] = {"name": "fedmagic"}
    raw["clients"]["sampling_rate"] = 1.5
    raw["model"]["weights"] = str(tmp_path / "missing.pt")
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError) as err:
        parse(raw)
    msg = str(err.value)
    assert "clients.sampling_rate must be in (0, 1], got 1.5" in msg
    assert "strategy.name: unknown strategy 'fedmagic'; valid: " in msg and "fedavg" in msg
    assert "model.weights" in msg and "missing.pt" in msg
    assert "train.learning_rate: unknown key" in msg
    assert all(line.startswith("fedsim: config error: ") for line in msg.splitlines())
    assert len(msg.splitlines()) == 4


def test_overrides_and_strategy_params_are_validated():
    cfg = load(TINY, ["rounds=7", "train.lr=0.01", "data.client_domains=[rainy]"])
    assert (cfg.rounds, cfg.train.lr, cfg.data.client_domains) == (7, 0.01, ["rainy"])
    with pytest.raises(ConfigError, match="strategy.params.mu: unknown parameter for fedavg"):
        load(TINY, ["strategy.params.mu=0.1"])
    with pytest.raises(ConfigError, match="unknown synthetic domain"):
        load(TINY, ["data.client_domains=[sunny_mars]"])


def test_config_key_ignores_tracking_only():
    a = ExperimentConfig()
    b = ExperimentConfig.model_validate({"tracking": {"experiment": "other"}})
    c = ExperimentConfig.model_validate({"seed": 1})
    assert a.key() == b.key() != c.key()


def test_server_prox_at_its_default_keeps_every_recorded_run_key():
    base = ExperimentConfig()
    assert "server_prox" not in base.model_dump(mode="json")["train"]
    assert ExperimentConfig.model_validate({"train": {"server_prox": 0.0}}).key() == base.key()
    pulled = ExperimentConfig.model_validate({"train": {"server_prox": 10.0}})
    assert pulled.key() != base.key() and pulled.flat()["train.server_prox"] == "10.0"
    with pytest.raises(ValueError, match="server_prox"):
        ExperimentConfig.model_validate({"train": {"server_prox": -1}})


def test_teacher_scales_at_their_default_keep_every_recorded_run_key():
    base = ExperimentConfig()
    assert "teacher_scales" not in base.model_dump(mode="json")["train"]
    assert ExperimentConfig.model_validate({"train": {"teacher_scales": [1]}}).key() == base.key()
    both = ExperimentConfig.model_validate({"train": {"teacher_scales": [2, 1]}})
    assert both.train.teacher_scales == (1, 2) and both.key() != base.key()
    for bad in ([], [0, 1], [2, 2]):
        with pytest.raises(ConfigError, match="train.teacher_scales must be distinct integers >= 1"):
            parse({"train": {"teacher_scales": bad}})


def test_cli_rejects_bad_config_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("sampling_rate: 1.0", "sampling_rate: 1.5"))
    result = run_fedsim(["run", str(bad), "--set", "strategy.name=nope"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "clients.sampling_rate must be in (0, 1], got 1.5" in result.stderr
    assert "strategy.name: unknown strategy 'nope'" in result.stderr
    assert not (tmp_path / "runs").exists()
    ray_procs = subprocess.run(["pgrep", "-f", f"raylet.*{tmp_path}"], capture_output=True)
    assert ray_procs.returncode == 1


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "space" in raw or "base" in raw:  # sweep files name a base experiment instead
            continue
        if (raw.get("data") or {}).get("format") == "yolo":
            continue  # point at data sets a user brings
        load(path)


def test_set_reads_exponent_floats_as_numbers():
    from fedsim.config import apply_overrides

    raw = apply_overrides({}, ["train.lr=1e-4", "strategy.params.mu=5e-3", "name=abc", "rounds=3"])
    assert raw == {"train": {"lr": 1e-4}, "strategy": {"params": {"mu": 5e-3}}, "name": "abc", "rounds": 3}
