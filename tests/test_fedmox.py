import numpy as np
import pytest
import torch

from fedsim.config import ExperimentConfig
from fedsim.model.detector import build_detector, is_backbone_key, train_mode, trainable_keys
from fedsim.model.moe import moe_head
from fedsim.preflight import load
from fedsim.types import ClientResult
from strategies import build
from tests.conftest import TINY, run_fedsim


def fedmox(**params) -> object:
    return build(ExperimentConfig.model_validate({"strategy": {"name": "fedmox", "params": params}}))


def arrays():
    g = {"w": np.array([1.0, 1.0], np.float32), "bn.num_batches_tracked": np.array(3, np.int64)}
    c0 = {"w": np.array([3.0, 5.0], np.float32), "bn.num_batches_tracked": np.array(9, np.int64)}
    c1 = {"w": np.array([7.0, 1.0], np.float32), "bn.num_batches_tracked": np.array(4, np.int64)}
    return g, [ClientResult(0, 1, c0, 1), ClientResult(1, 1, c1, 3)]


def test_alpha_zero_is_fedavg_and_alpha_one_ignores_clients():
    g, results = arrays()
    fedavg_w = (np.array([3.0, 5.0]) * 1 + np.array([7.0, 1.0]) * 3) / 4  # [6, 2]
    np.testing.assert_allclose(fedmox(alpha=0.0).aggregate(g, results, 1)["w"], fedavg_w)
    np.testing.assert_allclose(fedmox(alpha=1.0).aggregate(g, results, 1)["w"], g["w"])
    np.testing.assert_allclose(fedmox(alpha=0.25).aggregate(g, results, 1)["w"], 0.25 * g["w"] + 0.75 * fedavg_w)
    # integer buffers are copied from the server model, never mixed
    assert fedmox(alpha=0.25).aggregate(g, results, 1)["bn.num_batches_tracked"] == 3


def test_usage_weighting_averages_each_expert_by_its_users():
    strategy = fedmox(num_experts=2, alpha=0.0, usage_weighting=True)
    g = {"model.22.box_experts.0.weight": np.zeros((2, 1), np.float32)}
    c0 = ClientResult(
        0,
        1,
        {"model.22.box_experts.0.weight": np.array([[1.0], [5.0]], np.float32)},
        1,
        metrics={"routing/count_0": 10.0, "routing/count_1": 0.0},
    )
    c1 = ClientResult(
        1,
        1,
        {"model.22.box_experts.0.weight": np.array([[3.0], [9.0]], np.float32)},
        1,
        metrics={"routing/count_0": 5.0, "routing/count_1": 5.0},
    )
    out = strategy.aggregate(g, [c0, c1], 1)["model.22.box_experts.0.weight"]
    # expert 0: shares 1.0 and 0.5 -> (1*1 + 3*0.5)/1.5; expert 1: only client 1 used it -> 9
    np.testing.assert_allclose(out, [[(1.0 + 1.5) / 1.5], [9.0]])


def test_moe_model_travels_routers_and_experts_but_not_the_backbone(cpu_threads):
    cfg = load(TINY, ["strategy.name=fedmox", "strategy.params.num_experts=3"])
    model = build(cfg).build_model(build_detector(cfg.model.arch, cfg.data.classes))
    keys = trainable_keys(model)
    assert any("routers" in k for k in keys) and any("box_experts" in k for k in keys)
    assert not any(is_backbone_key(model, k) for k in keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("routers" in n for n in trainable) and not any(is_backbone_key(model, n) for n in trainable)
    assert moe_head(model).num_experts == 3


def test_tiny_fedmox_run_end_to_end(tmp_path):
    result = run_fedsim(
        [
            "run",
            str(TINY),
            "--set",
            "strategy.name=fedmox",
            "--set",
            "strategy.params.num_experts=2",
            "--set",
            "rounds=1",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tiny"]).iloc[0]
    assert run["tags.strategy"] == "fedmox" and run["status"] == "FINISHED"
    routing = [c for c in run.index if c.startswith("metrics.routing/rainy/expert_")]
    assert len(routing) == 2 and abs(sum(run[c] for c in routing) - 1.0) < 1e-6
    assert "metrics.server/routing/expert_0" in run.index


def test_global_router_fails_early_with_a_clear_error(tmp_path):
    result = run_fedsim(
        ["run", str(TINY), "--set", "strategy.name=fedmox", "--set", "strategy.params.router=global"],
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 1
    assert "fedsim: run failed:" in result.stderr and "cannot change resolution" in result.stderr
    assert "expects a last-level feature map" in result.stderr


def test_routing_mutual_information_against_hand_values():
    from strategies.fedmox import mutual_information

    assert mutual_information(np.array([[10.0, 10.0], [10.0, 10.0]])) == pytest.approx(0.0)
    assert mutual_information(np.array([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)  # log2(2 domains)
    # p = [[.4, .1], [.1, .4]]: I = 2 * (.4 log2(.4/.25) + .1 log2(.1/.25))
    expected = 2 * (0.4 * np.log2(0.4 / 0.25) + 0.1 * np.log2(0.1 / 0.25))
    assert mutual_information(np.array([[40.0, 10.0], [10.0, 40.0]])) == pytest.approx(expected)


def test_routing_mi_spans_rounds_that_each_hold_one_domain():
    """At r = 0.33 every round trains one domain; the figure must still see domains that route apart."""
    from fedsim.types import ClientResult
    from strategies.fedmox import FedMox, FedMoxParams

    def result(client: int, counts: list[float]) -> ClientResult:
        return ClientResult(client, 1, {}, 10, metrics={f"routing/count_{e}": c for e, c in enumerate(counts)})

    domains = {0: "rainy", 1: "snowy"}
    strategy = FedMox(FedMoxParams(num_experts=2), None)
    first = strategy.round_metrics([result(0, [30.0, 0.0])], domains)
    assert first["routing/mi_bits"] == pytest.approx(0.0) and first["routing/rainy/expert_0"] == 1.0
    second = strategy.round_metrics([result(1, [0.0, 5.0])], domains)
    # rainy's last shares [1, 0] and snowy's [0, 1], weighted equally: log2(2 domains) bits
    assert second["routing/mi_bits"] == pytest.approx(1.0) and second["routing/domains_seen"] == 2

    resumed = FedMox(FedMoxParams(num_experts=2), None)
    resumed.load_state_dict(strategy.state_dict())
    third = [s.round_metrics([result(0, [10.0, 10.0])], domains) for s in (strategy, resumed)]
    assert third[0] == third[1]
    # rainy now [.5, .5], snowy [0, 1]: p = [[.25, .25], [0, .5]]
    p, col = np.array([0.25, 0.25, 0.5]), np.array([0.25, 0.75, 0.75])  # joint cells > 0, their column sums
    expected = float((p * np.log2(p / (0.5 * col))).sum())
    assert third[0]["routing/mi_bits"] == pytest.approx(expected)


def test_resolution_routing_sends_low_res_inputs_to_the_second_half_of_the_experts(cpu_threads):
    cfg = load(TINY, ["strategy.name=fedmox", "strategy.params.route_by=resolution", "strategy.params.route_coef=1.0"])
    strategy = build(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes))
    head = moe_head(model)
    high = (cfg.data.height, cfg.data.width)
    low = (round(cfg.data.height * cfg.data.client_scale), round(cfg.data.width * cfg.data.client_scale))
    gen = torch.Generator().manual_seed(0)
    images = {hw: torch.rand(2, 3, *hw, generator=gen) for hw in (high, low)}

    def low_share(hw) -> float:  # in training mode: the neck's BatchNorm normalises with batch statistics
        with torch.no_grad():
            train_mode(model)
            model(images[hw])
        counts = head.last_routing_counts
        return float(counts[2:].sum() / counts.sum())

    before = abs(low_share(low) - low_share(high))
    train_mode(model)
    model(images[low])
    assert strategy.resolution_group(head) == [2, 3]
    model(images[high])
    assert strategy.resolution_group(head) == [0, 1]

    routers = [p for n, p in model.named_parameters() if "routers" in n]
    optimizer = torch.optim.Adam(routers, lr=0.05)
    for _ in range(80):
        for hw in (high, low):
            train_mode(model)
            model(images[hw])
            optimizer.zero_grad()
            strategy.extra_loss(model).backward()
            optimizer.step()
    # Before training both resolutions route alike; after it, each goes to its own half.
    assert before < 0.5 and low_share(low) > 0.9 and low_share(high) < 0.2


def test_resolution_routing_needs_two_experts():
    with pytest.raises(ValueError, match="num_experts >= 2"):
        fedmox(num_experts=1, route_by="resolution")


def test_client_routing_trains_each_clients_expert_and_the_server_all_of_them(cpu_threads):
    cfg = load(TINY, ["strategy.name=fedmox", "strategy.params.route_by=client", "strategy.params.router=image"])
    strategy = build(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes))
    head = moe_head(model)
    assert [strategy.client_expert(c) for c in range(7)] == [1, 2, 3, 1, 2, 3, 1]  # expert 0: the server's
    strategy.begin_training(model, client_id=4)
    assert head.force_expert == 2 and not head.average_experts
    train_mode(model)
    model(torch.rand(2, 3, 64, 96))
    # the routing loss pulls toward the client's expert: -log p_2, the same at every location of an image
    logits = head.last_router_logits[0]
    want = -logits.log_softmax(dim=1)[:, 2].mean()
    torch.testing.assert_close(strategy.extra_loss(model), want)  # route_coef 1
    strategy.begin_training(model)  # the server: every expert trains, its own images route to expert 0
    assert head.force_expert is None and head.average_experts
    model(torch.rand(2, 3, 64, 96))
    torch.testing.assert_close(strategy.extra_loss(model), -head.last_router_logits[0].log_softmax(dim=1)[:, 0].mean())


def test_client_routing_averages_an_expert_over_the_clients_that_trained_it():
    strategy = fedmox(num_experts=3, alpha=0.0, route_by="client")
    key = "model.22.box_experts.0.weight"
    g = {key: np.zeros((3, 1), np.float32), "neck": np.zeros(1, np.float32)}

    def result(client: int, expert_values: list[float], n: int) -> ClientResult:
        update = {
            key: np.array([[v] for v in expert_values], np.float32),
            "neck": np.array([float(client)], np.float32),
        }
        return ClientResult(client, 1, update, n)

    # clients 0 and 2 train expert 1, client 1 expert 2; untrained slices drifted (weight decay) and must not count
    out = strategy.aggregate(
        g, [result(0, [-1.0, 2.0, -1.0], 1), result(1, [-1.0, -1.0, 6.0], 1), result(2, [-1.0, 5.0, -1.0], 2)], 1
    )
    np.testing.assert_allclose(out[key], [[0.0], [(2.0 + 2 * 5.0) / 3], [6.0]])
    np.testing.assert_allclose(out["neck"], [(0 + 1 + 2 * 2) / 4])  # shared parts: plain FedAvg
