"""Uplink codecs against hand-computed arrays, top-k error feedback, and the backbone's lower precisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.compression import (
    decode,
    decode_deltas,
    encode,
    int8_decode,
    int8_encode,
    topk_count,
    topk_decode,
    topk_encode,
    topk_positions,
)
from fedsim.config import CompressionConfig
from fedsim.model.precision import Int8WeightConv2d, lower_backbone
from fedsim.runtime.uplink import Uplink
from fedsim.types import ClientResult


def states(seed: int = 0) -> tuple[dict, dict]:
    """A received state and a client's state: conv weights, a bias, a BN counter."""
    rng = np.random.default_rng(seed)
    received = {
        "model.10.conv.weight": rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32),
        "model.10.bn.bias": rng.normal(0, 0.1, 32).astype(np.float32),
        "model.10.bn.num_batches_tracked": np.array(5, np.int64),
    }
    update = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) if v.dtype.kind == "f" else np.array(9)
              for k, v in received.items()}  # fmt: skip
    return received, update


def test_fp16_is_exact_for_values_float16_represents():
    received = {"w": np.zeros(5, np.float32)}
    update = {"w": np.array([0.5, -1.25, 3.0, 2.0**-10, 0.0], np.float32)}
    payload, residual = encode(update, received, CompressionConfig(uplink="fp16"))
    assert payload.arrays["w"].dtype == np.float16 and residual is None
    assert np.array_equal(decode(payload, received, CompressionConfig(uplink="fp16"))["w"], update["w"])
    assert payload.nbytes == 10


def test_int8_by_hand_and_within_half_a_step():
    q, lo, scale = int8_encode(np.array([-1.0, -0.5, 0.3, 1.0], np.float32), per_channel=False)
    # lo = -1, scale = 2/255: levels (x + 1) / scale = 0, 63.75, 165.75, 255 -> 0, 64, 166, 255, minus 128
    assert q.tolist() == [-128, -64, 38, 127] and lo.tolist() == [-1.0]
    assert scale[0] == np.float32(2 / 255)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (6, 3, 2, 2)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    for per_channel in (False, True):
        q, lo, scale = int8_encode(x, per_channel)
        assert q.dtype == np.int8 and lo.shape == scale.shape == ((6,) if per_channel else (1,))
        err = np.abs(int8_decode(q, lo, scale, per_channel) - x).reshape(scale.size, -1)
        bound = scale[:, None] / 2
        assert (err <= bound * (1 + 1e-6) + 1e-7).all()
    # per channel, each channel's step follows its own range: the small channels are far finer
    _, _, per_tensor = int8_encode(x, False)
    _, _, per_channel_scale = int8_encode(x, True)
    assert per_channel_scale[0] < per_tensor[0] / 3


def test_int8_update_sends_a_quarter_and_ints_travel_unchanged():
    received, update = states()
    for granularity in ("tensor", "channel"):
        cfg = CompressionConfig(uplink="int8", int8_granularity=granularity)
        payload, _ = encode(update, received, cfg)
        assert payload.raw["model.10.bn.num_batches_tracked"] == 9
        floats = sum(v.nbytes for v in update.values() if v.dtype.kind == "f")
        assert payload.nbytes - 8 <= 0.27 * floats
        out = decode(payload, received, cfg)
        assert out["model.10.bn.num_batches_tracked"].dtype == np.int64
        assert np.abs(out["model.10.conv.weight"] - update["model.10.conv.weight"]).max() < 1e-3


def test_topk_keeps_exactly_k_entries_the_largest():
    received, update = states()
    cfg = CompressionConfig(uplink="topk", topk_fraction=0.1)
    payload, residual = encode(update, received, cfg)
    n = 32 * 16 * 9 + 32
    k = topk_count(n, 0.1)
    values, bitmap = payload.arrays["values"], payload.arrays["bitmap"]
    assert values.shape == (k,) and values.dtype == np.float16
    assert bitmap.dtype == np.uint8 and bitmap.shape == (math.ceil(n / 8),)  # one bit per entry
    kept = topk_positions(bitmap, n)
    assert kept.size == k and np.array_equal(kept, np.sort(kept))
    deltas = decode_deltas(payload, per_channel=True)
    flat = np.concatenate([d.reshape(-1) for d in deltas.values()])
    assert np.array_equal(np.flatnonzero(flat), kept)
    true = np.concatenate([(update[key] - received[key]).reshape(-1) for key in deltas])
    sent = np.zeros(n, bool)
    sent[kept] = True
    assert np.abs(true[sent]).min() >= np.abs(true[~sent]).max()
    # the values are the float16 roundings of the true ones
    assert np.array_equal(flat[kept], true[kept].astype(np.float16).astype(np.float32))
    # the residual is everything not decoded (left-out entries and float16 rounding), exactly
    rest = np.concatenate([residual[key].reshape(-1) for key in deltas])
    assert np.array_equal(rest[~sent], true[~sent]) and np.abs(rest[sent]).max() > 0
    assert np.array_equal(rest + flat, true)
    # 1/8 byte per entry for the positions, 2 per kept value
    assert payload.nbytes - 8 == math.ceil(n / 8) + 2 * k
    assert payload.nbytes - 8 <= 0.085 * sum(v.nbytes for v in update.values() if v.dtype.kind == "f")


def test_topk_positions_are_exact_at_any_size_and_values_clip_to_float16():
    flat = np.array([0.0, 1e6, -3.0, 2.0**-30, 0.5, -7.0, 0.0, 1.0, 2.0, 4.0, -9.0], np.float32)
    values, bitmap = topk_encode(flat, 4)
    assert topk_positions(bitmap, flat.size).tolist() == [1, 5, 9, 10]  # 11 entries: 2 bytes, 5 pad bits
    assert bitmap.nbytes == 2 and values.tolist() == [65504.0, -7.0, 4.0, -9.0]
    assert topk_decode(values, bitmap, flat.size).tolist() == [0, 65504, 0, 0, 0, -7, 0, 0, 0, 4, -9]
    values, bitmap = topk_encode(flat, flat.size)  # k = n: everything, tiny values round to 0 in float16
    assert topk_positions(bitmap, flat.size).size == flat.size and values[3] == 0


def test_error_feedback_loses_nothing_over_rounds():
    """sum of decoded deltas over rounds + final residual == sum of the true deltas."""
    cfg = CompressionConfig(uplink="topk", topk_fraction=0.05)
    rng = np.random.default_rng(3)
    received = {"a": np.zeros((16, 8), np.float32), "b": np.zeros(40, np.float32)}
    residual, sent, true = None, 0.0, 0.0
    for _ in range(6):
        update = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in received.items()}
        payload, residual = encode(update, received, cfg, residual)
        sent = sent + np.concatenate([d.reshape(-1) for d in decode_deltas(payload, True).values()])
        true = true + np.concatenate([update[k].reshape(-1) for k in received])
    left = np.concatenate([residual.get(k, np.zeros_like(v)).reshape(-1) for k, v in received.items()])
    assert np.allclose(sent + left, true, atol=1e-5)


def test_driver_decodes_and_keeps_only_kept_clients_residuals():
    received, update = states()
    uplink = Uplink(CompressionConfig(uplink="topk"))
    payload, residual = encode(update, received, uplink.cfg)
    result = ClientResult(7, 1, {}, 4, payload=payload, residual=residual)
    uplink.receive([result], received)
    assert result.payload is None and result.residual is None and set(result.update) == set(update)
    assert uplink.residual_of(7).keys() == residual.keys() and uplink.residual_of(8) is None
    restored = Uplink(uplink.cfg)
    restored.load_state_dict(torch.load(_saved(uplink.state_dict()), weights_only=True))
    assert all(np.array_equal(restored.residuals[7][k], residual[k]) for k in residual)


def _saved(blob: dict):
    import io

    buf = io.BytesIO()
    torch.save(blob, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_lowered_backbone_keeps_the_head_float32_and_close(mode, cpu_threads):
    from fedsim.model.detector import build_detector, trainable_keys

    torch.manual_seed(0)
    model = build_detector("yolov8n.yaml", ["a", "b"]).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
    keys = trainable_keys(model)
    lower_backbone(model, mode)
    assert trainable_keys(model) == keys and all(model.state_dict()[k].dtype != torch.bfloat16 for k in keys)
    if mode == "int8":
        assert isinstance(model.model[0].conv, Int8WeightConv2d)
    with torch.no_grad():
        after = model(x)[0]
    assert after.dtype == torch.float32
    assert torch.allclose(after, before, rtol=0.1, atol=0.5)  # boxes in pixels, scores in [0, 1]


def test_a_client_job_with_an_int8_backbone_sends_a_topk_payload(cpu_threads):
    """The code a client actor runs, in-process: lowered backbone, encoded update, residual back."""
    from fedsim.experiment import prepare_data, prepare_weights
    from fedsim.model.detector import build_detector, get_state, model_spec
    from fedsim.preflight import load
    from fedsim.runtime.client import ClientWorker
    from fedsim.runtime.rounds import ShardIndex
    from fedsim.types import ClientJob
    from strategies import build
    from tests.conftest import TINY

    small = ["data.server_images=8", "data.client_images=8", "data.test_images=4"]
    cfg = load(TINY, [*small, "model.client_backbone=int8", "compression.uplink=topk"])
    partition = prepare_data(cfg, echo=lambda _: None)
    strategy = build(cfg)
    model = strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes, prepare_weights(cfg)))
    worker = ClientWorker(cfg.model_dump(mode="json"), model_spec(model), get_state(model, list(model.state_dict())), 1)
    received = get_state(model, strategy.state_keys(model))
    shard = ShardIndex.from_partition(partition).shard(0)
    result = worker.run(ClientJob(0, 1, shard.images, partition.client_imgsz, 0, strategy.client_plan(1)), received)
    assert isinstance(result, ClientResult), getattr(result, "error", "")
    assert result.update == {} and result.payload.codec == "topk" and result.residual
    assert result.telemetry.bytes_up == result.payload.nbytes < 0.09 * sum(v.nbytes for v in received.values())
    decoded = decode(result.payload, received, cfg.compression)
    assert decoded.keys() == received.keys() and all(decoded[k].dtype == received[k].dtype for k in received)
