"""The one tiny sweep that test_sweeps.py and test_compare.py both inspect, run once per session.

pytest gives a fixture imported into two modules two definitions, so a session fixture alone
would run the sweep twice; the module-level memo below makes the second call free.

The sweep is 4 trials of tiny.yaml at 3 rounds, 2 at a time, ASHA with grace 1 and factor 2.
Its objective is the server's box loss (tiny's mAP@50 is too coarse for ASHA to rank). The
first three trials are fixed: two sensible learning rates, then lr=0.05, which wrecks the
trainable layers in the clients' first steps (AdamW moves every weight by about the lr a step),
so its round-1 server loss is far above the others; it starts only after a sensible trial has
finished, so ASHA stops it at its first rung. The fourth is Optuna's.

A weak trial at lr=1e-7 (barely training) was not reliably worse: a 2-step server epoch's mean
loss hardly depends on the lr, and on one machine that trial's first-rung loss was the lowest.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import yaml

from tests.conftest import TINY

STOPPED_LR = 0.05
_MEMO: dict[str, SimpleNamespace] = {}


def write_sweep(path: Path, uri: str, experiment: str, **fields) -> Path:
    spec = {
        "name": path.stem,
        "base": str(TINY),
        "overrides": [f"tracking.experiment={experiment}", f"tracking.uri={uri}"] + fields.pop("overrides", []),
        "seed": 0,
        "storage": str(path.parent / "sweeps" / path.stem),
        **fields,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main_sweep(tmp_path_factory) -> SimpleNamespace:
    if "main" in _MEMO:
        return _MEMO["main"]
    import ray

    from sweeps.tune import run_sweep

    root = tmp_path_factory.mktemp("sweep-main")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = "test-sweep"
    path = write_sweep(
        root / "main.yaml",
        uri,
        experiment,
        # No warm-up, so the rounds' learning rate is all the model learns with.
        overrides=["rounds=3", "train.warmup_epochs=0"],
        num_samples=4,
        max_concurrent_trials=2,
        metric="server/box_loss",
        mode="min",
        scheduler={"grace_period": 1, "reduction_factor": 2},
        points_to_evaluate=[
            {"train.lr": 1.0e-3, "train.conf_thres": 0.1},
            {"train.lr": 2.0e-3, "train.conf_thres": 0.3},
            {"train.lr": STOPPED_LR, "train.conf_thres": 0.2},
        ],
        space={
            "train.lr": {"type": "float", "low": 1.0e-7, "high": 5.0e-2, "log": True},
            "train.conf_thres": {"type": "float", "low": 0.05, "high": 0.5},
        },
    )
    try:
        result = run_sweep(path)
    finally:
        ray.shutdown()
    _MEMO["main"] = SimpleNamespace(root=root, uri=uri, experiment=experiment, path=path, result=result)
    return _MEMO["main"]
