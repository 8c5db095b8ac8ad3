"""Uplink codecs: a client's update as it travels back, and the driver's decoding of it.

Pure numpy, no model and no Ray: ``encode`` runs in the client actor, ``decode`` on the driver before
``strategy.aggregate``, so every strategy sees ordinary states.

Every codec works on the float entries' *delta* (client state minus the state it received): deltas
span a far smaller range than weights, which is what makes 8 bits enough. Integer entries
(BatchNorm ``num_batches_tracked``) travel unchanged in ``Payload.raw``.

- ``fp16``: the delta cast to float16 (exact for values float16 represents).
- ``int8``: affine 8-bit per tensor, or per output channel (axis 0 of a tensor of two or more
  dimensions; vectors stay per tensor, since a scale per element would cost more than it saves).
  ``q = round((x - lo) / scale) - 128`` with ``scale = (max - min) / 255``, so every element is off
  by at most ``scale / 2``. A float32 ``lo`` and ``scale`` travel per tensor or channel.
- ``topk``: the ``topk_fraction`` largest-magnitude entries of ``delta + residual`` over all float
  entries at once, with error feedback: what was not sent is the client's new residual, added to
  its next delta (Stich et al. 2018, Karimireddy et al. 2019). The kept positions travel as a
  bitmap (``np.packbits`` over the flat float entries: one bit per entry, exact) and their values
  as float16, in ascending position order. The residual is ``(delta + old residual) - decoded``,
  so it absorbs the float16 rounding as well as the entries left out. Per float entry that is
  ``1/8 + 2 * fraction`` bytes against 4: about 0.08 of float32 at a fraction of 0.1 (int32
  indices and float32 values cost 0.20).

``Payload.nbytes`` (the sum of the travelling arrays' ``nbytes``) is what ``bytes_up`` counts.
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.config import CompressionConfig
from fedsim.types import Payload, State

INT8_LEVELS = 255


def is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


# -- fp16 -------------------------------------------------------------------------------------
def fp16_encode(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def fp16_decode(h: np.ndarray) -> np.ndarray:
    return h.astype(np.float32)


# -- int8 -------------------------------------------------------------------------------------
def _rows(x: np.ndarray, per_channel: bool) -> np.ndarray:
    """``x`` as (groups, elements): one row per output channel, or a single row."""
    return x.reshape(x.shape[0], -1) if per_channel and x.ndim >= 2 else x.reshape(1, -1)


def int8_encode(x: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 in x's shape, lo float32 per group, scale float32 per group)."""
    rows = _rows(x, per_channel).astype(np.float64)
    if rows.size == 0:
        zeros = np.zeros(rows.shape[0], np.float32)
        return np.zeros(x.shape, np.int8), zeros, zeros.copy()
    lo = rows.min(axis=1).astype(np.float32)
    scale = ((rows.max(axis=1) - lo) / INT8_LEVELS).astype(np.float32)
    # Quantize against the float32 lo and scale that travel, so the scale / 2 bound holds for them.
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    levels = np.clip(np.rint((rows - lo.astype(np.float64)[:, None]) / safe), 0, INT8_LEVELS)
    q = (levels - 128).astype(np.int8).reshape(x.shape)
    return q, lo, scale


def int8_decode(q: np.ndarray, lo: np.ndarray, scale: np.ndarray, per_channel: bool) -> np.ndarray:
    rows = _rows(q, per_channel).astype(np.float64) + 128
    out = rows * scale.astype(np.float64)[:, None] + lo.astype(np.float64)[:, None]
    return out.astype(np.float32).reshape(q.shape)


# -- top-k ------------------------------------------------------------------------------------
def topk_count(n: int, fraction: float) -> int:
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def topk_encode(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values float16, packed bitmap uint8) of the ``k`` largest-magnitude entries of ``flat``.

    Values are in ascending position order and clipped to float16's finite range (the residual
    keeps whatever the clipping or the rounding left out).
    """
    if k >= flat.size:
        mask = np.ones(flat.size, bool)
    else:
        mask = np.zeros(flat.size, bool)
        mask[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    fmax = float(np.finfo(np.float16).max)
    values = np.clip(flat[mask], -fmax, fmax).astype(np.float16)
    return values, np.packbits(mask)


def topk_positions(bitmap: np.ndarray, size: int) -> np.ndarray:
    """The kept flat positions, ascending, from the packed bitmap of ``size`` entries."""
    return np.flatnonzero(np.unpackbits(bitmap, count=size))


def topk_decode(values: np.ndarray, bitmap: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, np.float32)
    out[topk_positions(bitmap, size)] = values.astype(np.float32)
    return out


# -- whole updates ----------------------------------------------------------------------------
def _split(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> State:
    out, start = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        out[key] = flat[start : start + n].reshape(shape)
        start += n
    return out


def encode(
    update: State, received: State, cfg: CompressionConfig, residual: State | None = None
) -> tuple[Payload, State | None]:
    """The payload for ``update`` (a client state) against ``received``, and the new residual (top-k).

    The residual holds only entries with something left in them (a client whose delta was all
    sent keeps nothing), as float32.
    """
    if cfg.uplink == "none":
        raise ValueError("uplink 'none' sends the state itself; there is nothing to encode")
    floats = [k for k, v in update.items() if is_float(v)]
    raw = {k: v for k, v in update.items() if not is_float(v)}
    shapes = {k: tuple(update[k].shape) for k in floats}
    deltas = {k: update[k].astype(np.float32) - received[k].astype(np.float32) for k in floats}
    per_channel = cfg.int8_granularity == "channel"
    arrays: dict[str, np.ndarray] = {}
    new_residual: State | None = None
    if cfg.uplink == "fp16":
        arrays = {k: fp16_encode(d) for k, d in deltas.items()}
    elif cfg.uplink == "int8":
        for k, d in deltas.items():
            arrays[k], arrays[f"{k}/lo"], arrays[f"{k}/scale"] = int8_encode(d, per_channel)
    else:
        residual = residual or {}
        flat = np.concatenate(
            [(d + residual[k] if k in residual else d).reshape(-1) for k, d in deltas.items()]
            or [np.zeros(0, np.float32)]
        ).astype(np.float32)
        arrays["values"], arrays["bitmap"] = topk_encode(flat, topk_count(flat.size, cfg.topk_fraction))
        flat -= topk_decode(arrays["values"], arrays["bitmap"], flat.size)  # what the driver will add
        new_residual = {k: v.copy() for k, v in _split(flat, shapes).items() if v.any()}
        # entries that do not travel this round (FedSTO's phase 1) keep their residual for later
        new_residual.update({k: v for k, v in residual.items() if k not in shapes})
    return Payload(cfg.uplink, arrays, raw, shapes), new_residual


def decode_deltas(payload: Payload, per_channel: bool) -> State:
    """The float entries' deltas as the driver reconstructs them (float32)."""
    a = payload.arrays
    if payload.codec == "fp16":
        return {k: fp16_decode(a[k]) for k in payload.shapes}
    if payload.codec == "int8":
        return {k: int8_decode(a[k], a[f"{k}/lo"], a[f"{k}/scale"], per_channel) for k in payload.shapes}
    if payload.codec == "topk":
        size = sum(math.prod(s) for s in payload.shapes.values())
        return _split(topk_decode(a["values"], a["bitmap"], size), payload.shapes)
    raise ValueError(f"unknown codec {payload.codec!r}")


def decode(payload: Payload, received: State, cfg: CompressionConfig) -> State:
    """The client's state: ``received`` plus the decoded deltas, integer entries as sent."""
    deltas = decode_deltas(payload, cfg.int8_granularity == "channel")
    out: State = {k: (received[k].astype(np.float32) + d).astype(received[k].dtype) for k, d in deltas.items()}
    out.update(payload.raw)
    return out
