"""``fedsim compare``'s overlay of every strategy's curve, with its band over seeds, on a hand-built table."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from dashboards.plots import band_by_round, curves_overlay

COLUMNS = ["run_id", "run", "strategy", "sweep", "key", "round", "value"]


def curves() -> pd.DataFrame:
    """fedavg: 3 seeds, the third stopped after round 1; fedmox: 2 seeds; one run without a strategy tag."""
    per_run = {
        ("a0", "fedavg"): [0.40, 0.50, 0.60],
        ("a1", "fedavg"): [0.20, 0.30, 0.40],
        ("a2", "fedavg"): [0.30, 0.10],
        ("m0", "fedmox"): [0.40, 0.70, 0.80],
        ("m1", "fedmox"): [0.40, 0.50, 0.60],
        ("x0", None): [0.10, 0.20],
    }
    rows = []
    for (run_id, strategy), values in per_run.items():
        for rnd, value in enumerate(values):
            rows.append([run_id, f"run-{run_id}", strategy, None, "map50/total", rnd, value])
            rows.append([run_id, f"run-{run_id}", strategy, None, "bytes_up", rnd, 1e6])
    return pd.DataFrame(rows, columns=COLUMNS)


def test_band_by_round_mean_min_max_and_count() -> None:
    band = band_by_round(curves(), "map50/total")
    assert list(band.columns) == ["strategy", "round", "mean", "low", "high", "n"]
    expected = pd.DataFrame(
        [
            ["-", 0, 0.10, 0.10, 0.10, 1],
            ["-", 1, 0.20, 0.20, 0.20, 1],
            ["fedavg", 0, 0.30, 0.20, 0.40, 3],
            ["fedavg", 1, 0.30, 0.10, 0.50, 3],
            ["fedavg", 2, 0.50, 0.40, 0.60, 2],  # the stopped seed is out of round 2
            ["fedmox", 0, 0.40, 0.40, 0.40, 2],
            ["fedmox", 1, 0.60, 0.50, 0.70, 2],
            ["fedmox", 2, 0.70, 0.60, 0.80, 2],
        ],
        columns=band.columns,
    )
    assert (
        band[["strategy", "round", "n"]].astype({"round": int, "n": int}).equals(expected[["strategy", "round", "n"]])
    )
    for column in ("mean", "low", "high"):
        assert band[column].tolist() == pytest.approx(expected[column].tolist())
    assert band_by_round(curves(), "bytes_up")["mean"].tolist() == pytest.approx([1e6] * 8)
    assert band_by_round(curves(), "map50/night").empty


def test_curves_overlay_is_a_png() -> None:
    for table in (curves(), curves().iloc[0:0]):
        png = curves_overlay(table, "map50/total")
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 300 and height > 200
