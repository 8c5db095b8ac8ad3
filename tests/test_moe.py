"""Sparse spatial MoE Detect head (fedsim.model.moe)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import fedsim  # noqa: F401  (YOLO_OFFLINE before ultralytics)
from fedsim.model.detector import (
    build_detector,
    freeze_backbone,
    get_state,
    set_state,
    train_mode,
    trainable_keys,
)
from fedsim.model.moe import (
    GlobalRouterMoEDetect,
    ImageRouterMoEDetect,
    MoEDetect,
    convert_to_moe,
    group_routing_loss,
    moe_aux_loss,
)

torch.set_num_threads(1)

NAMES = ["a", "b", "c", "d", "e"]
K = 4
HW_SMALL = (64, 96)  # (H, W), non-square
HW_LARGE = (96, 160)


def _images(hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(seed))


def _batch(hw: tuple[int, int]) -> dict:
    return {
        "img": _images(hw),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [3.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2], [0.6, 0.4, 0.3, 0.5]]),
    }


def _model(init_noise: float = 0.3, balance_coef: float = 0.0, calibrate: bool = True, **kw):
    torch.manual_seed(0)
    model = build_detector("yolov8n.yaml", NAMES)
    calibration = _images(HW_SMALL, seed=7) if calibrate else None
    convert_to_moe(model, K, balance_coef=balance_coef, init_noise=init_noise, calibration=calibration, **kw)
    return model


def _locations(hw: tuple[int, int]) -> list[tuple[int, int]]:
    return [(hw[0] // s, hw[1] // s) for s in (8, 16, 32)]


def test_router_logits_shape_at_two_resolutions():
    model = _model()
    head = model.model[-1]
    train_mode(model)
    for hw in (HW_SMALL, HW_LARGE):
        feats = model(_images(hw))["feats"]
        logits = head.router_logits(feats)
        assert [tuple(t.shape) for t in logits] == [(2, K, h, w) for h, w in _locations(hw)]
        assert [tuple(t.shape) for t in head.last_expert_index] == [(2, h, w) for h, w in _locations(hw)]


def test_exactly_one_expert_per_location():
    model = _model()
    head = model.model[-1]
    model.eval()
    with torch.no_grad():
        _, preds = model(_images(HW_LARGE))
        logits = head.router_logits(preds["feats"])
    total = 0
    for lvl, (index, lg) in enumerate(zip(head.last_expert_index, logits, strict=True)):
        assert index.dtype == torch.long and int(index.min()) >= 0 and int(index.max()) < K
        assert torch.equal(index, lg.argmax(dim=1))
        assert torch.equal(head.last_level_counts[lvl], torch.bincount(index.flatten(), minlength=K))
        total += index.numel()
    assert int(head.last_routing_counts.sum()) == total == 2 * sum(h * w for h, w in _locations(HW_LARGE))


def test_location_output_equals_its_chosen_expert_output():
    model = _model(init_noise=0.5)
    head = model.model[-1]
    train_mode(model)
    out = model(_images(HW_LARGE))
    feats, used = out["feats"], 0
    start = 0
    with torch.no_grad():
        for i, index in enumerate(head.last_expert_index):
            sb, sc = head.cv2[i](feats[i]), head.cv3[i](feats[i])
            n = index[0].numel()
            got_box = out["boxes"][:, :, start : start + n].reshape(sb.shape[0], -1, *index.shape[1:])
            got_cls = out["scores"][:, :, start : start + n].reshape(sc.shape[0], -1, *index.shape[1:])
            start += n
            for k in range(K):
                mask = (index == k)[:, None]
                if not mask.any():
                    continue
                used += 1
                want_box, want_cls = head.box_experts[i].dense(sb, k), head.cls_experts[i].dense(sc, k)
                for got, want in ((got_box, want_box), (got_cls, want_cls)):
                    sel = mask.expand_as(got)
                    torch.testing.assert_close(got[sel], want[sel], atol=1e-5, rtol=1e-5)
                # another expert would have given a different answer there
                other = head.box_experts[i].dense(sb, (k + 1) % K)
                assert (other - want_box).masked_select(mask.expand_as(other)).abs().max() > 1e-3
    assert start == out["boxes"].shape[-1]
    assert used > 3  # several experts were exercised across the levels


def test_identical_experts_reproduce_dense_head():
    torch.manual_seed(0)
    dense = build_detector("yolov8n.yaml", NAMES)
    moe = convert_to_moe(copy.deepcopy(dense), K, init_noise=0.0)
    dense.eval()
    moe.eval()
    x = _images(HW_SMALL)
    with torch.no_grad():
        y_dense, _ = dense(x)
        y_moe, _ = moe(x)
    torch.testing.assert_close(y_moe, y_dense, atol=1e-5, rtol=1e-5)


def test_expert_compute_is_sparse(monkeypatch):
    model = _model()
    model.eval()
    rows = []
    real_addmm = torch.addmm

    def counting_addmm(bias, mat1, mat2, *a, **kw):
        rows.append(mat1.shape[0])
        return real_addmm(bias, mat1, mat2, *a, **kw)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    with torch.no_grad():
        model(_images(HW_LARGE))
    locations = 2 * sum(h * w for h, w in _locations(HW_LARGE))
    assert sum(rows) == 2 * locations  # box + cls projection once per location, not K times


def test_router_receives_gradients_from_detection_loss():
    model = _model()
    freeze_backbone(model)
    train_mode(model)
    loss, items = model.loss(_batch(HW_SMALL))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.sum().backward()
    head = model.model[-1]
    for router in head.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0
    used = head.last_level_counts[0] > 0
    assert head.box_experts[0].weight.grad[used].abs().sum(dim=(1, 2)).gt(0).all()
    assert head.cls_experts[0].weight.grad[used].abs().sum(dim=(1, 2)).gt(0).all()
    assert all(p.grad is None for p in model.model[0].parameters())  # backbone stays frozen


def test_converted_model_trainable_state_includes_router_and_experts():
    model = _model()
    keys = trainable_keys(model)
    head_index = model.model[-1].i
    for name in ("routers.0.weight", "routers.2.bias", "box_experts.1.weight", "cls_experts.2.bias"):
        assert f"model.{head_index}.{name}" in keys
    state = get_state(model)
    key = f"model.{head_index}.routers.1.weight"
    assert state[key].shape == (K, model.model[-1].routers[1].in_channels, 1, 1)
    state[key] = state[key] + 1.0
    set_state(model, state)
    torch.testing.assert_close(model.model[-1].routers[1].weight.detach().numpy(), state[key])


def test_copies_and_pickles_after_a_training_forward():
    model = _model(balance_coef=0.1)
    train_mode(model)
    model.loss(_batch(HW_SMALL))
    assert model.model[-1].aux_loss.requires_grad
    clone = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    for m in (clone, again):
        assert isinstance(m.model[-1], MoEDetect)
        m.eval()
        with torch.no_grad():
            m(_images(HW_SMALL))


def test_eval_output_decodes_and_nms_runs():
    from ultralytics.utils.nms import non_max_suppression

    model = _model()
    model.eval()
    with torch.no_grad():
        y, preds = model(_images(HW_LARGE))
    anchors = sum(h * w for h, w in _locations(HW_LARGE))
    assert y.shape == (2, 4 + len(NAMES), anchors)
    assert set(preds) == {"boxes", "scores", "feats"}
    xy = y[:, :2]
    assert torch.isfinite(y).all() and (xy >= -HW_LARGE[1]).all() and (xy <= 2 * HW_LARGE[1]).all()
    dets = non_max_suppression(y, conf_thres=0.0, iou_thres=0.5, max_det=50)
    assert len(dets) == 2
    for d in dets:
        assert d.ndim == 2 and d.shape[1] == 6 and 0 < d.shape[0] <= 50
        assert int(d[:, 5].max()) < len(NAMES)


def test_calibration_spreads_routing_and_leaves_batchnorm_alone():
    torch.manual_seed(0)
    model = build_detector("yolov8n.yaml", NAMES)
    bn_before = model.model[15].cv1.bn.running_mean.clone()
    convert_to_moe(model, K, calibration=_images(HW_SMALL, seed=3))
    assert torch.equal(model.model[15].cv1.bn.running_mean, bn_before)
    assert model.training
    head = model.model[-1]
    assert int(head.routing_counts.sum()) == 0  # calibration is not counted
    model.eval()
    with torch.no_grad():
        model(_images(HW_SMALL, seed=3))
    assert (head.last_level_counts > 0).sum(dim=1).ge(2).all()  # no level sends everything to one expert


def test_global_router_one_expert_per_image_and_rejects_other_resolution():
    model = _model(router="global", input_hw=HW_SMALL)
    head = model.model[-1]
    assert isinstance(head, GlobalRouterMoEDetect)
    model.eval()
    with torch.no_grad():
        model(_images(HW_SMALL))
    for b in range(2):
        choices = torch.cat([idx[b].flatten() for idx in head.last_expert_index])
        assert (choices == choices[0]).all()
    c, h, w = head.feat_chw
    assert (h, w) == (HW_SMALL[0] // 32, HW_SMALL[1] // 32)
    got = f"{c}x{HW_LARGE[0] // 32}x{HW_LARGE[1] // 32}"
    with pytest.raises(ValueError, match=rf"built for input 64x96.*expects .*{c}x{h}x{w}.*got {got}"):
        with torch.no_grad():
            model(_images(HW_LARGE))


def test_global_router_needs_input_size():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="input_hw"):
        convert_to_moe(build_detector("yolov8n.yaml", NAMES), K, router="global")


def test_balance_term():
    model = _model(balance_coef=0.0)
    head = model.model[-1]
    train_mode(model)
    model(_images(HW_SMALL))
    assert float(head.aux_loss.detach()) == 0.0 and float(moe_aux_loss(model).detach()) == 0.0

    head.balance_coef = 0.1
    model(_images(HW_SMALL))
    spread = float(head.aux_loss.detach())
    assert spread > 0 and spread == pytest.approx(0.1 * head.last_balance)
    head.aux_loss.backward()
    assert head.routers[0].weight.grad.abs().sum() > 0

    with torch.no_grad():  # push every location to expert 0
        for r in head.routers:
            r.bias[0] += 50.0
    model(_images(HW_SMALL))
    assert int(head.last_routing_counts[0]) == int(head.last_routing_counts.sum())
    collapsed = float(head.aux_loss.detach())
    assert collapsed == pytest.approx(0.1 * K, rel=1e-3)
    assert collapsed > spread + 0.1


def test_group_routing_loss_against_hand_values():
    model = _model(calibrate=False)
    head = model.model[-1]
    with pytest.raises(ValueError, match="forward pass first"):
        group_routing_loss(head, [0])
    # Two levels by hand: level 0 has one location with logits (0, 0, ln 2, ln 2): p = (1, 1, 2, 2) / 6,
    # so group {2, 3} holds 4/6 and group {0} 1/6; level 1 puts almost everything on expert 0.
    head.last_router_logits = [
        torch.tensor([[0.0, 0.0, math.log(2.0), math.log(2.0)]]),
        torch.tensor([[60.0, 0.0, 0.0, 0.0], [60.0, 0.0, 0.0, 0.0]]),
    ]
    high, low = group_routing_loss(head, [0]), group_routing_loss(head, [2, 3])
    assert float(high) == pytest.approx((-math.log(1 / 6) + 0.0) / 2, abs=1e-6)
    assert float(low) == pytest.approx((-math.log(4 / 6) + 60.0 - math.log(2.0)) / 2, abs=1e-4)


def test_group_routing_loss_trains_the_router_alone():
    model = _model()
    head = model.model[-1]
    train_mode(model)
    model(_images(HW_SMALL))
    group_routing_loss(head, [2, 3]).backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in head.routers)
    assert all(e.weight.grad is None for e in head.box_experts)
    assert all(e.weight.grad is None for e in head.cls_experts)


def test_routing_statistics_accumulate_and_reset():
    model = _model()
    head = model.model[-1]
    model.eval()
    head.reset_routing_stats()
    seen = torch.zeros(K, dtype=torch.long)
    with torch.no_grad():
        for hw in (HW_SMALL, HW_LARGE):
            model(_images(hw))
            seen += head.last_routing_counts
    assert torch.equal(head.routing_counts, seen)
    assert head.routing_fractions().sum().item() == pytest.approx(1.0)
    head.reset_routing_stats()
    assert int(head.routing_counts.sum()) == 0


def test_conversion_preserves_ultralytics_attributes():
    torch.manual_seed(0)
    model = build_detector("yolov8n.yaml", NAMES)
    dense = model.model[-1]
    attrs = {k: getattr(dense, k) for k in ("f", "i", "nc", "nl", "reg_max", "no", "legacy")}
    stride = dense.stride.clone()
    convert_to_moe(model, K)
    head = model.model[-1]
    assert {k: getattr(head, k) for k in attrs} == attrs
    assert torch.equal(head.stride, stride)
    assert head.type == "fedsim.model.moe.MoEDetect"
    assert head.np == sum(p.numel() for p in head.parameters())


def test_deep_experts_reproduce_dense_head_and_route_sparsely(monkeypatch):
    """expert_depth=2: each expert is a 3x3 conv (BatchNorm folded) + 1x1; identical experts give the
    dense head's output, and each location's patch is computed by one expert only."""
    torch.manual_seed(0)
    dense = build_detector("yolov8n.yaml", NAMES)
    moe = convert_to_moe(copy.deepcopy(dense), K, init_noise=0.0, expert_depth=2)
    dense.eval()
    moe.eval()
    x = _images(HW_SMALL)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], dense(x)[0], atol=1e-4, rtol=1e-4)

    model = _model(init_noise=0.5, expert_depth=2)
    head = model.model[-1]
    assert isinstance(head, MoEDetect) and head.expert_depth == 2
    rows = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda b, m1, m2, *a, **kw: rows.append(m1.shape[0]) or real_addmm(b, m1, m2))
    model.eval()
    with torch.no_grad():
        _, preds = model(_images(HW_LARGE))
    monkeypatch.undo()
    locations = 2 * sum(h * w for h, w in _locations(HW_LARGE))
    assert sum(rows) == 4 * locations  # (3x3 + 1x1) x (box + cls), once per location
    with torch.no_grad():  # a location's output is its chosen expert's, computed densely
        feats, start = preds["feats"], 0
        for i, index in enumerate(head.last_expert_index):
            sb = head.cv2[i](feats[i])
            n = index[0].numel()
            got = preds["boxes"][:, :, start : start + n].reshape(2, -1, *index.shape[1:])
            start += n
            for k in range(K):
                mask = (index == k)[:, None].expand_as(got)
                if mask.any():
                    want = head.box_experts[i].dense(sb, k)
                    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)


def _level_outputs(head: MoEDetect, feats: list[torch.Tensor], expert) -> torch.Tensor:
    """The head's training ``boxes`` output if every location took ``expert(level, box_stem)``."""
    out = []
    for i, f in enumerate(feats):
        y = expert(i, head.cv2[i](f))
        out.append(y.flatten(2))
    return torch.cat(out, dim=-1)


def test_image_router_picks_one_expert_per_image_at_any_resolution():
    model = _model(init_noise=0.5, router="image", expert_depth=2)
    head = model.model[-1]
    assert isinstance(head, ImageRouterMoEDetect)
    model.eval()
    with torch.no_grad():
        for hw in (HW_SMALL, HW_LARGE):
            model(torch.cat([_images(hw, seed=s) for s in range(4)]))
            first = [index[:, 0, 0] for index in head.last_expert_index]
            for index in head.last_expert_index:  # every location of an image, every level: one expert
                assert torch.equal(index, first[0][:, None, None].expand_as(index))
    # calibration centres the summed logits on its images
    calibration = _images(HW_SMALL, seed=7)
    feats = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(list(args[0])))
    with torch.no_grad():
        model(calibration)
    hook.remove()
    centred = head.router_logits(feats[0])[0].mean(dim=(0, 2, 3))
    torch.testing.assert_close(centred, torch.zeros(K), atol=1e-5, rtol=0)


def test_forced_and_averaged_experts_and_the_router_statistics_they_keep():
    model = _model(init_noise=0.5, expert_depth=2)
    head = model.model[-1]
    train_mode(model)
    x = _images(HW_LARGE)
    with torch.no_grad():
        chosen = model(x)
        own_index = [i.clone() for i in head.last_expert_index]
        head.force_expert = 2
        forced = model(x)
        feats = forced["feats"]
        torch.testing.assert_close(
            forced["boxes"],
            _level_outputs(head, feats, lambda i, s: head.box_experts[i].dense(s, 2)),
            atol=1e-4,
            rtol=0,
        )
        assert not torch.allclose(forced["boxes"], chosen["boxes"], atol=1e-3)
        # the statistics keep the router's own choices, not the forced expert
        assert all(torch.equal(a, b) for a, b in zip(head.last_expert_index, own_index, strict=True))
        model.eval()  # forcing holds in eval too (a client's teacher is an eval-mode copy)
        y_forced, _ = model(x)
        head.force_expert = None
        y_free, _ = model(x)
        assert not torch.allclose(y_forced, y_free, atol=1e-3)

        train_mode(model)
        head.average_experts = True
        averaged = model(x)
        want = _level_outputs(
            head, averaged["feats"], lambda i, s: sum(head.box_experts[i].dense(s, k) for k in range(K)) / K
        )
        torch.testing.assert_close(averaged["boxes"], want, atol=1e-4, rtol=0)
        model.eval()  # averaging is a training-mode override: evaluation routes
        y_eval, _ = model(x)
        head.average_experts = False
        torch.testing.assert_close(y_eval, model(x)[0], atol=0, rtol=0)


def test_averaged_experts_all_learn_and_the_router_learns_nothing_from_detection():
    model = _model(init_noise=0.5, expert_depth=2)
    freeze_backbone(model)
    head = model.model[-1]
    head.average_experts = True
    train_mode(model)
    loss, _ = model.loss(_batch(HW_SMALL))
    loss.sum().backward()
    for experts in (head.box_experts, head.cls_experts):
        grad = experts[0].proj.weight.grad
        assert all(float(grad[k].abs().sum()) > 0 for k in range(K))
    assert all(r.weight.grad is None or float(r.weight.grad.abs().sum()) == 0 for r in head.routers)
