"""``fedsim check``: what ``fedsim run`` verifies before it starts, without starting Ray."""

from __future__ import annotations

import os

import pytest
import ray
import torch
from ultralytics.nn.tasks import ClassificationModel

from fedsim.cli import main
from fedsim.model.detector import build_detector, save_checkpoint
from tests.conftest import REPO, TINY, run_fedsim


def check(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out = capsys.readouterr()
    assert not ray.is_initialized()
    return code, out.out, out.err


def problems(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fedsim: check: ")]


def test_a_runnable_config_passes_with_a_summary(capsys, tmp_path):
    weights = tmp_path / "coco80.pt"
    save_checkpoint(build_detector("yolov8n.yaml", [f"c{i}" for i in range(80)]), weights)
    code, out, err = check(capsys, str(TINY), "--set", f"model.weights={weights}")
    assert code == 0, err
    assert "check: ok" in out
    assert "80 classes" in out and "5 classes" in out  # the class-count change the weights imply
    assert "data: synthetic" in out and "clients: 2 of 2 per round" in out


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(os.urandom(2048)), "is not a readable PyTorch checkpoint"),
        (lambda p: p.write_text("model: yolov8n\nepochs: 3\n"), "is not a readable PyTorch checkpoint"),
        (
            lambda p: torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)}, p),
            "holds a ClassificationModel, not a detection model",
        ),
    ],
    ids=["random-bytes", "text-file", "classifier"],
)
def test_unusable_weights_are_refused_in_one_line(capsys, tmp_path, make, expected):
    path = tmp_path / "weights.pt"
    make(path)
    code, _, err = check(capsys, str(TINY), "--set", f"model.weights={path}")
    assert code == 2
    (line,) = problems(err)
    assert line.startswith("fedsim: check: model.weights:") and str(path) in line and expected in line


def test_missing_data_and_empty_shards_are_refused(capsys, tmp_path):
    code, _, err = check(capsys, str(TINY), "--set", "data.format=yolo", "--set", f"data.root={tmp_path / 'nope'}")
    assert code == 2
    assert problems(err) == [f"fedsim: check: data: data root {tmp_path / 'nope'} does not exist or is not a directory"]

    code, _, err = check(capsys, str(TINY), "--set", "clients.num_clients=100")
    assert code == 2
    lines = problems(err)
    assert len(lines) == 2  # rainy and snowy: 50 clients each for 16 images
    assert all("clients.num_clients=100" in line and "16 images" in line and "empty" in line for line in lines)
    assert "'rainy'" in lines[0] and "'snowy'" in lines[1]


def test_profiles_are_checked_against_this_machine(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = check(capsys, str(TINY), "--set", "clients.profile=gpu-quarter")
    assert code == 2
    assert problems(err) == [
        "fedsim: check: clients.profile: gpu-quarter needs 0.25 GPU per client; this machine has no CUDA device"
    ]


def test_switching_method_drops_the_other_methods_params(capsys):
    demo = str(REPO / "configs" / "demo.yaml")
    code, out, err = check(capsys, demo, "--set", "strategy.name=fedavg")
    assert code == 0, err
    assert "fedsim: strategy fedavg: dropped parameter(s) num_experts, alpha of another method" in out
    # a parameter no method knows is still an error, and so is one for the wrong method given by hand
    assert main(["check", demo, "--set", "strategy.name=fedavg", "--set", "strategy.params.nonsense=1"]) == 2
    assert "strategy.params.nonsense: unknown parameter for fedavg" in capsys.readouterr().err
    assert main(["check", str(TINY), "--set", "strategy.params.num_experts=2"]) == 2
    assert "strategy.params.num_experts: unknown parameter for fedavg" in capsys.readouterr().err


def test_run_refuses_a_corrupt_checkpoint_before_ray_starts(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 256)
    result = run_fedsim(["run", str(TINY), "--set", f"model.weights={junk}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fedsim: check: model.weights: {junk} is not a readable PyTorch checkpoint "
        "(neither a zip archive nor a pickle)"
    ]
    assert not (tmp_path / "runs").exists()  # nothing written, no Ray started
