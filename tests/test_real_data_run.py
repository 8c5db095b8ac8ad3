"""A tiny simulation on a BDD100K-format fixture, converted with `fedsim data bdd100k`."""

import json

import cv2
import mlflow

from fedsim.data.synthetic import CLASSES, render
from tests.conftest import TINY, run_fedsim

BDD_NAMES = {"car": "car", "truck": "truck", "bus": "bus", "pedestrian": "pedestrian", "traffic_sign": "traffic sign"}


def write_bdd_fixture(root, per_domain=10):
    """Scenes from the synthetic renderer, stored as BDD100K stores them: JPEGs + one JSON list."""
    images = root / "images"
    images.mkdir(parents=True)
    frames = []
    weather = {"partly cloudy": "cloudy", "rainy": "rainy", "snowy": "snowy"}
    for bdd_weather, style in weather.items():
        for i in range(per_domain):
            img, labels = render(style, i, seed=3, width=128, height=64)
            name = f"{style}-{i:03d}.jpg"
            cv2.imwrite(str(images / name), img)
            objs = [
                {
                    "category": BDD_NAMES[CLASSES[int(c)]],
                    "box2d": {
                        "x1": (x - w / 2) * 128,
                        "y1": (y - h / 2) * 64,
                        "x2": (x + w / 2) * 128,
                        "y2": (y + h / 2) * 64,
                    },
                }
                for c, x, y, w, h in labels
            ]
            objs.append({"category": "lane", "poly2d": [[0, 0], [1, 1]]})  # not a box: counted, dropped
            frames.append(
                {"name": name, "attributes": {"weather": bdd_weather, "timeofday": "daytime"}, "labels": objs}
            )
    frames.append({"name": "missing.jpg", "attributes": {"weather": "rainy"}, "labels": []})
    (root / "det_train.json").write_text(json.dumps(frames))
    return root / "det_train.json", images


def test_tiny_run_on_converted_bdd100k_fixture(tmp_path):
    labels, images = write_bdd_fixture(tmp_path / "bdd")
    out = tmp_path / "bdd-yolo"
    conv = run_fedsim(
        ["data", "bdd100k", "--labels", str(labels), "--images", str(images), "--out", str(out)],
        cwd=tmp_path,
        timeout=120,
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["partly_cloudy", "rainy", "snowy"]
    assert "missing.jpg" in conv.stdout

    overrides = [
        "data.format=yolo",
        f"data.root={out}",
        "data.server_domains=[partly_cloudy]",
        "data.client_domains=[rainy,snowy]",
        "data.server_images=4",
        "data.client_images=6",
        "data.test_images=3",
        "rounds=1",
    ]
    result = run_fedsim(["run", str(TINY), *sum((["--set", o] for o in overrides), [])], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tiny"]).iloc[0]
    assert run["status"] == "FINISHED" and run["params.data.format"] == "yolo"
    for domain in ("partly_cloudy", "rainy", "snowy"):
        assert f"metrics.map50/{domain}" in run.index


def test_bad_real_data_fails_before_ray_with_paths(tmp_path):
    root = tmp_path / "data"
    for domain in ("cloudy", "rainy"):
        (root / domain / "images").mkdir(parents=True)
        (root / domain / "labels").mkdir(parents=True)
        for i in range(3):
            img, _ = render(domain, i, 0, 64, 32)
            cv2.imwrite(str(root / domain / "images" / f"{i}.jpg"), img)
            (root / domain / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "rainy" / "labels" / "1.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class out of range
    overrides = ["data.format=yolo", f"data.root={root}", "data.on_bad=fail", "data.client_domains=[rainy]"]
    result = run_fedsim(["run", str(TINY), *sum((["--set", o] for o in overrides), [])], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "fedsim: check: data:" in result.stderr and "rainy/labels/1.txt" in result.stderr
    assert not (tmp_path / "runs").exists()
