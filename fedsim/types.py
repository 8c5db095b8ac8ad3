"""Values that cross layers: what a strategy asks of the engine, and what travels to and from clients.

This module is floor 0 with ``fedsim.config``: it imports nothing of the project, so the runtime,
the strategies and the tests can all share these types without importing each other.

- ``ClientPlan``: the settings of one round's client jobs (a strategy's answer, typed).
- ``ServerPlan``: what the server trains on, which parts, with which extra loss. The engine applies
  the plan itself, the same way for a new run and a resumed one: strategies never set attributes on
  the server.
- ``ClientJob`` / ``ClientResult`` / ``ClientFailure``: the messages between the driver and a client
  actor. A result keeps device telemetry (``ClientTelemetry``: work, bytes, time, memory) apart from
  the method's own figures (``metrics``: losses, pseudo-label counts, routing counts).
- ``Payload``: a compressed update as it travels up (``fedsim/compression.py`` encodes and decodes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

State = dict[str, np.ndarray]
ExtraLoss = Callable[["nn.Module"], "torch.Tensor | None"]


@dataclass(frozen=True)
class ClientPlan:
    """How every client of a round trains: optimiser, pseudo-labelling and BatchNorm settings."""

    lr: float
    weight_decay: float
    epochs: int
    batch: int
    conf_thres: float  # teacher boxes at or above this become pseudo-labels
    ignore_thres: float | None  # class scores in [ignore_thres, conf_thres) get no class loss
    nms_iou: float
    ema_momentum: float  # the client's teacher, reset from the received model each job
    unsup_weight: float
    freeze_bn: bool  # keep the received BatchNorm statistics
    strong_scale: tuple[float, float] | None = None  # the student's strong view's zoom range; None: weak view
    negatives: str = "band"  # class targets off the pseudo-boxes: "band" (0, uncertain band ignored) | "soft"
    box_thres: float | None = None  # pseudo-boxes under this confidence teach no box regression
    class_thres: str = "fixed"  # "fixed": conf_thres for every class | "adaptive": fedsim.train.thresholds
    teacher_scales: tuple[int, ...] = (1,)  # the teacher labels the weak view at these integer upscalings


@dataclass(frozen=True)
class ServerPlan:
    """What the server's supervised epochs use in one round (round 0 is the warm-up).

    ``labeled``: ``"server"`` trains on the server's own labeled set; ``"server+clients"`` adds every
    client's true labels at the client resolution (the oracle's upper bound).
    """

    labeled: Literal["server", "server+clients"] = "server"
    frozen_backbone: bool = True  # backbone BatchNorm stays in eval mode
    extra_loss: ExtraLoss | None = None  # added to the supervised loss (FedSTO's ORN, MoE balance)


@dataclass(frozen=True)
class ClientJob:
    """Everything a client needs besides the round's global state (which travels once per round)."""

    client_id: int
    round: int
    images: str  # the client's unlabeled shard (a folder of low-resolution images)
    imgsz: int
    seed: int  # derived from (root seed, round, client): results do not depend on scheduling
    plan: ClientPlan | None  # None for ``clients.work: noop``
    threads: int | None = None  # the device profile's torch threads (None: the actor's default)
    budget_mib: float | None = None  # the device profile's memory budget (None: the actor's default)
    # Top-k error feedback: the residual a real device would keep in its own memory. The driver keeps
    # it between jobs so that actors stay stateless; it is not a transfer and counts in no bytes.
    residual: State | None = None


@dataclass
class Payload:
    """An encoded update. Only ``arrays`` and ``raw`` travel (and count as bytes): the names, shapes
    and order of the entries follow from the round's travelling keys, which both ends know.

    ``codec`` is ``fp16``, ``int8`` or ``topk``; ``arrays`` holds the codec's arrays of the float
    entries' deltas; ``raw`` the integer entries, unchanged; ``shapes`` the float entries in order.
    """

    codec: str
    arrays: dict[str, np.ndarray]
    raw: State
    shapes: dict[str, tuple[int, ...]]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()) + sum(a.nbytes for a in self.raw.values()))


@dataclass
class ClientTelemetry:
    """What the device spent on a job: the virtual clock's and the per-client table's inputs."""

    seconds: float = 0.0  # wall time in the actor
    peak_mem_mib: float = 0.0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    work_images: float = 0.0  # images processed, the clock's compute measure
    node: str = ""  # the Ray node id the job ran on


@dataclass
class ClientResult:
    client_id: int
    round: int
    update: State
    num_samples: int
    telemetry: ClientTelemetry = field(default_factory=ClientTelemetry)
    metrics: dict[str, float] = field(default_factory=dict)  # the method's figures (losses, routing)
    # With compression: what travelled (``update`` is empty until the driver decodes it) and the
    # client's new top-k residual (device memory, not a transfer).
    payload: Payload | None = None
    residual: State | None = None


@dataclass
class ClientFailure:
    client_id: int
    round: int
    error: str
    node: str = ""  # the Ray node id, when the actor answered
