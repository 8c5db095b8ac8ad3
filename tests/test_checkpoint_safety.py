"""Checkpoints load with torch.load(weights_only=True): fedsim's format as is, Ultralytics' via an allow-list."""

from __future__ import annotations

import copy
import os
import pickle
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.model.checkpoint import FORMAT, DetectorError, describe_detector, load_detector, save_detector
from fedsim.model.detector import build_detector, save_checkpoint
from fedsim.train.foundation import load_foundation

NAMES = ["car", "truck", "bus", "pedestrian", "traffic_sign"]


class Foreign:
    """A class no allow-list knows: stands in for arbitrary pickled code."""


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)
    return build_detector("yolov8n.yaml", NAMES)


@pytest.fixture(scope="module")
def trainer_ckpt(tmp_path_factory) -> Path:
    """An 80-class checkpoint laid out as Ultralytics' trainer (save_model) writes it, EMA in half precision."""
    from ultralytics import __version__
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    model.args = get_cfg()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    path = tmp_path_factory.mktemp("ultralytics") / "best.pt"
    ckpt = {
        "epoch": 2,
        "best_fitness": np.float64(0.25),
        "model": None,
        "ema": copy.deepcopy(model).half(),
        "updates": 40,
        "optimizer": optimizer.state_dict(),
        "train_args": vars(model.args),
        "train_metrics": {"metrics/mAP50(B)": np.float64(0.1), "fitness": np.float64(0.25)},
        "train_results": {"epoch": [1.0, 2.0], "train/box_loss": [2.1, 1.9]},
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
    }
    torch.save(ckpt, path)
    return path


def assert_refused(path: Path, *fragments: str, trust: bool = False) -> str:
    with pytest.raises(DetectorError) as info:
        load_detector(path, trust=trust)
    message = str(info.value)
    assert message.startswith("model.weights:") and str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_fedsim_format_round_trip_is_plain_weights_only(tmp_path, detector):
    path = tmp_path / "deep" / "mine.pt"
    save_detector(detector, path, source_images=12, epochs=3, note="demo")
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-list needed
    assert raw["format"] == FORMAT and raw["names"] == NAMES and raw["epochs"] == 3 and raw["note"] == "demo"
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_detector(path)
    assert type(loaded).__name__ == "DetectionModel" and not loaded.training
    assert loaded.names == dict(enumerate(NAMES))
    original = detector.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, original[k]), k
    # the foundation cache goes through save_checkpoint / load_foundation: the same format
    save_checkpoint(detector, tmp_path / "foundation.pt", source_images=8, epochs=1)
    assert torch.load(tmp_path / "foundation.pt", weights_only=True)["format"] == FORMAT
    assert torch.equal(
        load_foundation(tmp_path / "foundation.pt").state_dict()["model.0.conv.weight"], original["model.0.conv.weight"]
    )
    with pytest.raises(TypeError):
        save_detector(detector, tmp_path / "bad.pt", extra=[1, 2])


def test_ultralytics_trainer_checkpoint_loads_through_the_allow_list(trainer_ckpt):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(trainer_ckpt, weights_only=True)  # outside the allow-list it is refused
    model = load_detector(trainer_ckpt)
    assert type(model).__name__ == "DetectionModel" and model.model[-1].nc == 80 and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    five = build_detector("yolov8n.yaml", NAMES, weights=str(trainer_ckpt))
    assert five.model[-1].nc == 5


def test_unreadable_files_are_refused_in_one_line(tmp_path, trainer_ckpt):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    assert_refused(noise, "is not a readable PyTorch checkpoint (")
    text = tmp_path / "weights.pt"
    text.write_text("model:\n  arch: yolov8n.yaml\n  weights: yolov8n.pt\n")
    assert_refused(text, "is not a readable PyTorch checkpoint (")
    truncated = tmp_path / "truncated.pt"
    data = trainer_ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    message = assert_refused(truncated, "is not a readable PyTorch checkpoint (truncated")
    assert len(message) < len(str(truncated)) + 200
    assert_refused(tmp_path / "absent.pt", "file not found", "never downloads")


def test_wrong_kinds_of_model_are_refused(tmp_path, detector):
    from ultralytics.nn.tasks import ClassificationModel

    classifier = tmp_path / "cls.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False).half(), "ema": None}, classifier)
    assert_refused(classifier, "holds a ClassificationModel, not a detection model")
    plain = tmp_path / "state.pt"
    torch.save(detector.state_dict(), plain)
    assert_refused(plain, "holds no Ultralytics detection model")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    assert_refused(listed, "holds no Ultralytics detection model")


def test_foreign_classes_need_trust(tmp_path, detector):
    path = tmp_path / "foreign.pt"
    torch.save({"model": detector, "extra": Foreign()}, path)
    message = assert_refused(path, "outside fedsim's allow-list", "Foreign", "model.trust_checkpoint: true")
    assert f"{__name__}.Foreign" in message
    model = load_detector(path, trust=True)
    assert torch.equal(model.state_dict()["model.0.conv.weight"], detector.state_dict()["model.0.conv.weight"])


def test_fedsim_file_with_code_in_its_architecture_is_refused_not_run(tmp_path, detector):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    save_detector(detector, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["yaml"]["activation"] = f"open({str(marker)!r}, 'w').close() or nn.SiLU()"
    torch.save(ckpt, path)
    assert_refused(path, "architecture fedsim will not build", "activation")
    assert not marker.exists()


def test_describe_detector_reports_the_class_change(trainer_ckpt, tmp_path, detector):
    line = describe_detector(trainer_ckpt, NAMES)
    assert "\n" not in line and line.startswith(f"model.weights: {trainer_ckpt}")
    assert "yolov8n" in line and "80 classes" in line and "5 classes" in line and "re-initialised" in line
    save_detector(detector, tmp_path / "five.pt")
    assert "class count unchanged" in describe_detector(tmp_path / "five.pt", NAMES)
