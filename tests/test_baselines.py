from dataclasses import replace

import numpy as np
import pytest
import torch

from fedsim.config import ExperimentConfig
from fedsim.data.synthetic_format import prepare as synthetic_partition
from fedsim.model.detector import build_detector, get_state, trainable_keys
from fedsim.preflight import load
from fedsim.runtime.client import ClientWorker
from fedsim.train.proximal import proximal_term, with_proximal
from fedsim.train.supervised import make_loader
from fedsim.types import ClientJob, ServerPlan
from strategies import build
from strategies.fedsto import orthogonality_penalty
from tests.conftest import TINY


def strategy(name: str, **params):
    return build(ExperimentConfig.model_validate({"strategy": {"name": name, "params": params}}))


def test_proximal_gradient_matches_hand_computation():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    received = {"weight": torch.tensor([[0.5, 1.0]])}
    term = proximal_term(model, received, mu=0.1)
    assert term.item() == pytest.approx(0.05 * (0.25 + 9.0))
    term.backward()
    torch.testing.assert_close(model.weight.grad, 0.1 * torch.tensor([[0.5, -3.0]]))  # mu * (w - w_t)


def test_orthogonality_penalty_by_hand():
    assert orthogonality_penalty(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    assert orthogonality_penalty(q).item() == pytest.approx(0.0, abs=1e-5)
    # W = diag(2, 1): W^T W - I = diag(3, 0) -> 3, twice
    assert orthogonality_penalty(torch.diag(torch.tensor([2.0, 1.0]))).item() == pytest.approx(6.0)
    # W = [[1, 1]] (1x2): W^T W - I = [[0, 1], [1, 0]] -> 1; W W^T - I = [1] -> 1
    w = torch.tensor([[1.0, 1.0]])
    assert orthogonality_penalty(w).item() == pytest.approx(2.0)
    # the power-iteration estimate used in training agrees on a conv-shaped weight
    conv = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    exact = orthogonality_penalty(conv).item()
    assert orthogonality_penalty(conv, iters=50).item() == pytest.approx(exact, rel=1e-3)


def test_fedsto_trainable_set_per_phase(cpu_threads):
    sto = strategy("fedsto", phase1_rounds=2)
    model = sto.build_model(build_detector("yolov8n.yaml", list("abcde")))
    everything = trainable_keys(model)
    head = len(model.model) - 1
    phase1 = sto.travelling_keys(model, 1)
    assert phase1 == sto.travelling_keys(model, 2)
    assert phase1 and all(10 <= int(k.split(".")[1]) < head for k in phase1)  # the neck only
    assert sto.travelling_keys(model, 3) == everything
    head_only = strategy("fedsto", phase1_rounds=2, selective="head").travelling_keys(model, 1)
    assert head_only and all(int(k.split(".")[1]) == head for k in head_only)
    assert sto.client_loss_terms(model, {}, 1) is None and sto.client_loss_terms(model, {}, 3).item() > 0


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    cfg = load(TINY, ["data.server_images=4", "data.client_images=8", "data.test_images=2"])
    return cfg, synthetic_partition(cfg.data, 2, tmp_path_factory.mktemp("d"))


def client_update(cfg, part, name: str, **params) -> dict[str, np.ndarray]:
    cfg = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"name": name, "params": params})})
    s = build(cfg)
    torch.manual_seed(0)
    model = s.build_model(build_detector(cfg.model.arch, cfg.data.classes))
    worker = ClientWorker(
        cfg.model_dump(mode="json"), {"yaml": model.yaml}, get_state(model, list(model.state_dict())), threads=1
    )
    job = ClientJob(
        0,
        1,
        str(part.clients[0].images),
        part.client_imgsz,
        7,
        replace(s.client_plan(1), conf_thres=0.001, batch=2),
    )
    return worker.run(job, get_state(model)).update


def test_fedprox_mu_zero_equals_fedavg_and_mu_changes_the_update(shard, cpu_threads):
    cfg, part = shard
    fedavg = client_update(cfg, part, "fedavg")
    assert all(np.array_equal(fedavg[k], v) for k, v in client_update(cfg, part, "fedprox", mu=0.0).items())
    strong = client_update(cfg, part, "fedprox", mu=10.0)
    assert any(not np.array_equal(fedavg[k], v) for k, v in strong.items())


def test_centralized_strategies_shape_the_run():
    assert strategy("server_only").num_rounds() == 0 and not strategy("server_only").uses_clients
    assert strategy("scl_frozen").num_rounds() == ExperimentConfig().rounds
    model = strategy("scl_full").build_model(build_detector("yolov8n.yaml", list("abcde")))
    assert model.model[0].conv.weight.requires_grad
    assert len(strategy("scl_full").state_keys(model)) == len(model.state_dict())


def test_server_prox_keeps_the_round_epochs_near_the_aggregate(shard, cpu_threads):
    from fedsim.runtime.server import ServerTrainer

    cfg, part = shard

    def server_step(mu: float) -> float:
        train = cfg.train.model_copy(update={"server_prox": mu, "batch": 1})
        torch.manual_seed(0)
        model = build_detector(cfg.model.arch, cfg.data.classes)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        ServerTrainer(model, part, cfg.model_copy(update={"train": train})).train_epochs(1, 1, ServerPlan())
        return sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters()) ** 0.5

    free, pulled = server_step(0.0), server_step(1e6)
    assert free > 0 and pulled < 0.5 * free


def test_with_proximal_adds_the_term_to_the_strategys_own():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    anchor = {"weight": torch.tensor([[1.0]])}
    assert with_proximal(None, anchor, 0.5)(model).item() == pytest.approx(0.25 * 4.0)
    own = with_proximal(lambda m: m.weight.sum(), anchor, 0.5)(model)
    assert own.item() == pytest.approx(3.0 + 1.0)


def test_oracle_trains_every_holder_at_its_own_resolution(shard):
    from fedsim.runtime.server import ServerTrainer

    cfg, part = shard
    server = ServerTrainer(build_detector(cfg.model.arch, cfg.data.classes), part, cfg)
    server_only = len(server.dataset(ServerPlan()))
    labeled = server.dataset(strategy("oracle").server_plan(0))
    clients = sum(c.num_images for c in part.clients)
    assert len(labeled) == server_only + clients
    assert strategy("oracle").server_plan(3) == strategy("oracle").server_plan(0)  # every round, resumed or not
    seen, shapes = [], {}
    for batch in make_loader(labeled, cfg.train.batch, shuffle=True, seed=3):
        shape = tuple(batch["img"].shape[2:])
        holders = {"server" if "server" in f else "clients" for f in batch["im_file"]}
        assert len(holders) == 1  # a batch never mixes resolutions
        shapes.setdefault(holders.pop(), set()).add(shape)
        seen += batch["im_file"]
    assert len(seen) == len(set(seen)) == server_only + clients  # each labeled image once per epoch
    (hi,), (lo,) = shapes["server"], shapes["clients"]
    assert max(hi) == part.server_imgsz and max(lo) == part.client_imgsz < part.server_imgsz


def test_oracle_batchnorm_statistics_follow_the_server_batches_only(shard, cpu_threads):
    from fedsim.runtime.server import ServerTrainer
    from fedsim.train.supervised import make_optimizer, supervised_epoch

    cfg, part = shard
    torch.manual_seed(0)
    model = strategy("oracle").build_model(build_detector(cfg.model.arch, cfg.data.classes))
    server = ServerTrainer(model, part, cfg)
    labeled = server.dataset(strategy("oracle").server_plan(0))
    batches = list(make_loader(labeled, cfg.train.batch, shuffle=True, seed=3))

    def neck_stats() -> torch.Tensor:
        return torch.cat([m.running_mean for m in model.model[-2].modules() if isinstance(m, torch.nn.BatchNorm2d)])

    optimizer = make_optimizer(model, 1e-3, 0.0)
    for group in (1, 0):
        before = neck_stats().clone()
        chosen = [b for b in batches if set(b["group"]) == {group}]
        assert chosen
        supervised_epoch(model, chosen, optimizer, seed=0, scale=None)
        moved = not torch.equal(before, neck_stats())
        assert moved == (group == 0)  # the clients' low-res batches train weights, not statistics
