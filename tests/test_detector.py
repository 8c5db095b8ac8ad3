from dataclasses import replace

import numpy as np
import pytest
import torch

from fedsim.data.synthetic_format import prepare as synthetic_partition
from fedsim.model.detector import (
    DetectorError,
    backbone_size,
    build_detector,
    get_state,
    is_backbone_key,
    save_checkpoint,
    set_state,
    trainable_keys,
)
from fedsim.preflight import load
from fedsim.runtime.client import ClientWorker
from fedsim.runtime.server import ServerTrainer
from fedsim.types import ClientJob, ClientResult
from strategies import build as build_strategy
from tests.conftest import TINY

NAMES = ["car", "truck", "bus", "pedestrian", "traffic_sign"]


def backbone(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if is_backbone_key(model, k)}


def test_trainable_state_round_trip_and_scope(cpu_threads):
    model = build_detector("yolov8n.yaml", NAMES)
    keys = trainable_keys(model)
    assert backbone_size(model) == 10
    assert keys and all(int(k.split(".")[1]) >= 10 for k in keys)
    assert not any(".dfl." in k for k in keys)
    assert any(k.endswith("num_batches_tracked") for k in keys)  # buffers travel too
    state = get_state(model)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = build_detector("yolov8n.yaml", NAMES)
    assert not all(np.array_equal(state[k], v) for k, v in get_state(other).items())
    set_state(other, state)
    for k, v in get_state(other).items():
        assert v.dtype == state[k].dtype and np.array_equal(v, state[k])
    with pytest.raises(KeyError):
        set_state(other, {"model.99.nope": np.zeros(1)})


def test_local_checkpoint_loads_and_missing_file_is_an_error(tmp_path, cpu_threads):
    model = build_detector("yolov8n.yaml", NAMES)
    save_checkpoint(model, tmp_path / "mine.pt")
    loaded = build_detector("yolov8n.yaml", NAMES, weights=str(tmp_path / "mine.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    three = build_detector("yolov8n.yaml", NAMES[:3], weights=str(tmp_path / "mine.pt"))
    assert three.model[-1].nc == 3
    assert torch.equal(three.state_dict()["model.0.conv.weight"], model.state_dict()["model.0.conv.weight"])
    with pytest.raises(DetectorError, match="file not found.*never downloads"):
        build_detector("yolov8n.yaml", NAMES, weights=str(tmp_path / "yolov8n.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="not a readable PyTorch checkpoint"):
        build_detector("yolov8n.yaml", NAMES, weights=str(tmp_path / "junk.pt"))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    cfg = load(TINY, ["data.server_images=8", "data.client_images=8", "data.test_images=4"])
    part = synthetic_partition(cfg.data, cfg.clients.num_clients, tmp_path_factory.mktemp("data"))
    return cfg, part


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmox"])
def test_backbone_bit_identical_after_client_and_server_training(tiny_setup, strategy_name, cpu_threads):
    cfg, part = tiny_setup
    cfg = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"name": strategy_name})})
    strategy = build_strategy(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes))
    before = backbone(model)
    full = get_state(model, list(model.state_dict()))
    worker = ClientWorker(cfg.model_dump(mode="json"), {"yaml": model.yaml}, full, threads=1)
    # a permissive threshold so the random model produces pseudo-labels to learn from
    plan = replace(strategy.client_plan(1), conf_thres=0.001)
    job = ClientJob(0, 1, str(part.clients[0].images), part.client_imgsz, 123, plan)
    result = worker.run(job, get_state(model))
    assert isinstance(result, ClientResult), getattr(result, "error", "")
    assert result.metrics["n_pseudo"] > 0 and result.num_samples == part.clients[0].num_images
    assert set(result.update) == set(trainable_keys(model))
    assert any(not np.array_equal(result.update[k], v) for k, v in get_state(model).items())
    for k, v in backbone(worker.model).items():
        assert torch.equal(v, before[k]), k

    server = ServerTrainer(model, part, cfg)
    strategy.init_weights(model, server.samples())
    server.train_epochs(1, 1, strategy.server_plan(1))
    for k, v in backbone(model).items():
        assert torch.equal(v, before[k]), k
    assert any(not np.array_equal(v, full[k]) for k, v in get_state(model).items())


def test_client_failure_is_a_result_not_a_crash(tiny_setup, cpu_threads):
    cfg, part = tiny_setup
    model = build_strategy(cfg).build_model(build_detector(cfg.model.arch, cfg.data.classes))
    worker = ClientWorker(
        cfg.model_dump(mode="json"), {"yaml": model.yaml}, get_state(model, list(model.state_dict())), threads=1
    )
    job = ClientJob(1, 1, "/nonexistent/shard", part.client_imgsz, 1, build_strategy(cfg).client_plan(1))
    failure = worker.run(job, get_state(model))
    assert failure.client_id == 1 and "nonexistent" in failure.error
