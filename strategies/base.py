"""The Strategy interface and the aggregation maths every method shares.

The engine owns the round loop; a strategy answers its questions with values: which clients,
with which ``ClientPlan``, what trains and travels, what extra loss a client adds, how updates
combine, and (as a ``ServerPlan``) what the server trains on. A strategy never sets attributes on
the server or the engine, so a resumed run, which rebuilds everything from the config and the
checkpoint, gets exactly the answers an uninterrupted one got. ``FedAvg`` is this base class as it
stands; a method is a subclass that overrides one or two hooks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedsim.config import ExperimentConfig, clients_per_round
from fedsim.model.detector import freeze_backbone, trainable_keys
from fedsim.train.supervised import cosine_lr
from fedsim.types import ClientPlan, ClientResult, ServerPlan, State


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def weighted_average(states: list[State], weights: list[float]) -> State:
    """Weighted mean of float entries; integer entries (BN batch counters) take the max."""
    if not states:
        raise ValueError("nothing to average")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    out: State = {}
    for key, first in states[0].items():
        if np.issubdtype(first.dtype, np.floating):
            acc = sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states, strict=True))
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max([s[key] for s in states], axis=0).astype(first.dtype)
    return out


def mix(a: State, b: State, alpha: float) -> State:
    """``alpha * a + (1 - alpha) * b`` on float entries; integer entries are copied from ``a``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out: State = {}
    for key, va in a.items():
        if np.issubdtype(va.dtype, np.floating):
            out[key] = (alpha * va.astype(np.float64) + (1 - alpha) * b[key].astype(np.float64)).astype(va.dtype)
        else:
            out[key] = va.copy()
    return out


class Strategy:
    """Alternate training (server supervised <-> clients unsupervised) with sample-weighted FedAvg."""

    name: ClassVar[str] = "fedavg"
    Params: ClassVar[type[BaseModel]] = NoParams
    uses_clients: ClassVar[bool] = True

    def __init__(self, params: BaseModel, cfg: ExperimentConfig):
        self.params = params
        self.cfg = cfg

    # -- the model ---------------------------------------------------------------------------
    def build_model(self, model: nn.Module) -> nn.Module:
        """Shape the detector for this method (FedMox swaps the head); default: freeze the backbone."""
        freeze_backbone(model)
        return model

    def init_weights(self, model: nn.Module, samples: dict[str, torch.Tensor]) -> None:
        """Once, on a new run, before the warm-up: set initial weights from real images.

        ``samples`` holds one image batch per labeled set (``"server"``, ``"test/<domain>"``),
        floats in [0, 1]. Only state that the round checkpoints hold may change, so a resumed run
        (which restores that state instead) is unaffected.
        """

    def num_rounds(self) -> int:
        return self.cfg.rounds

    def state_keys(self, model: nn.Module) -> list[str]:
        """The server state that can change (checkpointed, broadcast): neck + head by default."""
        return trainable_keys(model)

    def travelling_keys(self, model: nn.Module, rnd: int) -> list[str]:
        """State entries a client trains and sends back in round ``rnd``."""
        return trainable_keys(model)

    # -- the clients ---------------------------------------------------------------------------
    def sample_clients(self, rnd: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        m = clients_per_round(self.cfg.clients.sampling_rate, num_clients)
        return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))

    def client_plan(self, rnd: int) -> ClientPlan:
        """Round ``rnd``'s client settings; the lr follows the server's cosine over the rounds, after a
        linear warm-up over ``train.client_lr_warmup_rounds``."""
        t = self.cfg.train
        ramp = min(1.0, rnd / (t.client_lr_warmup_rounds + 1))
        return ClientPlan(
            lr=cosine_lr(t.client_lr or t.lr, rnd - 1, self.cfg.rounds) * ramp,
            weight_decay=t.weight_decay,
            epochs=t.client_epochs,
            batch=t.batch,
            conf_thres=t.conf_thres,
            ignore_thres=t.ignore_thres,
            nms_iou=t.nms_iou,
            ema_momentum=t.ema_momentum,
            unsup_weight=t.unsup_weight,
            freeze_bn=t.client_bn_stats == "frozen",
            strong_scale=tuple(t.strong_scale) if t.student_view == "strong" else None,
            negatives=t.negatives,
            box_thres=t.box_thres,
            class_thres=t.class_thres,
            teacher_scales=tuple(t.teacher_scales),
        )

    def client_loss_terms(self, model: nn.Module, received: dict[str, torch.Tensor], rnd: int) -> torch.Tensor | None:
        """Extra loss a client adds to its own in round ``rnd`` (FedProx: proximal term).

        ``received`` is the global state the client started from."""
        return None

    def begin_training(self, model: nn.Module, client_id: int | None = None) -> None:
        """Before a client's local training (``client_id``: whose) and before the server's epochs
        (``None``). FedMox resets its routing counts and, routing by client, picks the experts."""

    def client_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures a client reports besides its losses (FedMox: routing counts)."""
        return {}

    # -- the server ---------------------------------------------------------------------------
    def aggregate(self, global_state: State, results: list[ClientResult], rnd: int) -> State:
        """Sample-weighted FedAvg over the entries clients sent; the rest keep the global value."""
        merged = dict(global_state)
        merged.update(weighted_average([r.update for r in results], [r.num_samples for r in results]))
        return merged

    def server_plan(self, rnd: int) -> ServerPlan:
        """What the server's supervised epochs use in round ``rnd`` (0: the warm-up)."""
        return ServerPlan()

    def server_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures from the server's epochs of a round (FedMox: routing fractions)."""
        return {}

    def round_metrics(self, results: list[ClientResult], domains: dict[int, str]) -> dict[str, float]:
        """Method-specific figures to log for a round, given each client's domain."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state that changes over rounds (checkpointed); plain values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
