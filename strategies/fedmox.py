"""FedMox: a sparse spatial mixture-of-experts head plus Soft-Mixture aggregation.

- ``build_model`` swaps the dense Detect head for ``MoEDetect`` (K experts, one 1x1 spatial router
  per level, top-1 per location; see ``fedsim/model/moe.py``), so one module serves the server's
  high-res and the clients' low-res images. Each expert is the branch's last 3x3 conv and its 1x1
  projection (``expert_depth: 2``, the default) or the projection alone (``1``).
- ``aggregate`` is Soft-Mixture: ``w_mix = alpha * w_t + (1 - alpha) * FedAvg(clients)`` over every
  exchanged float tensor (neck, experts, routers); integer buffers are copied. alpha = 0 is FedAvg,
  alpha = 1 ignores the clients. The server's supervised epoch follows (base ``server_update``).
- Optional resolution routing (``route_by: resolution``): the router is also trained to send every
  location of a low-resolution input (narrower than the geometric mean of the server's and the
  clients' widths) to the second half of the experts, and of a high-resolution one to the first
  half, with weight ``route_coef``. The server's scale-jittered batches fall on both sides, the
  clients' always on the low side, so the server's epoch and the clients' pseudo-labels stop
  pulling the same experts; at test time the learned router alone decides.
- Optional client routing (``route_by: client``, ``router: image`` advised): experts become domain
  heads. Client ``i`` trains (and its teacher labels with) expert ``1 + i mod (K - 1)`` alone; the
  server's epochs train every expert alike on the mean of their outputs and keep expert 0 for the
  server's own images. The router is trained, with weight ``route_coef``, to predict that expert
  from the image, and alone decides at test time. With clients dealt domains round robin (the
  embedded benchmark's layout, ``N`` a multiple of ``K - 1 = 3`` domains) each expert holds one
  domain: a ceiling for what domain-aware experts can add, not a clustering of unknown domains.
- Optional expert-usage weighting: each expert's slice is averaged with client weights
  ``n_i * share of locations client i routed to that expert``, so an expert a client never used is
  not pulled toward that client's untouched copy.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fedsim.config import ExperimentConfig
from fedsim.model.detector import freeze_backbone
from fedsim.model.moe import (
    MoEDetect,
    calibrate_model_routers,
    convert_to_moe,
    group_routing_loss,
    moe_aux_loss,
    moe_head,
)
from fedsim.types import ClientResult, ServerPlan, State
from strategies.base import Strategy, mix


class FedMoxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_experts: int = Field(4, ge=1, le=16)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    balance_coef: float = Field(0.0, ge=0.0)
    init_noise: float = Field(0.01, ge=0.0)
    router: Literal["spatial", "image", "global"] = "spatial"
    usage_weighting: bool = False
    # 1: experts are the last 1x1 projections behind shared 3x3 stems; 2: the last 3x3 conv too.
    expert_depth: int = Field(2, ge=1, le=2)
    route_by: Literal["none", "resolution", "client"] = "none"
    route_coef: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _groups_need_two_experts(self) -> FedMoxParams:
        if self.route_by != "none" and self.num_experts < 2:
            raise ValueError(f"route_by={self.route_by!r} splits the experts into two groups: needs num_experts >= 2")
        return self


def _routing_counts(result: ClientResult, num_experts: int) -> np.ndarray:
    """Locations a client routed to each expert, as its ``client_metrics`` reported them."""
    return np.array([result.metrics.get(f"routing/count_{e}", 0.0) for e in range(num_experts)])


def _expert_keys(state: State) -> list[str]:
    return [k for k in state if "_experts." in k]


class FedMox(Strategy):
    name = "fedmox"
    Params = FedMoxParams

    def __init__(self, params: BaseModel, cfg: ExperimentConfig):
        super().__init__(params, cfg)
        self._latest_shares: dict[str, list[float]] = {}  # domain -> expert shares, its last round

    def build_model(self, model: nn.Module) -> nn.Module:
        p = self.params
        hw = (self.cfg.data.height, self.cfg.data.width)
        convert_to_moe(
            model,
            p.num_experts,
            p.balance_coef,
            p.init_noise,
            router=p.router,
            input_hw=hw,
            expert_depth=p.expert_depth,
        )
        freeze_backbone(model)
        return model

    def init_weights(self, model: nn.Module, samples: dict[str, torch.Tensor]) -> None:
        # Centre the router logits on real server features so routing starts spread out.
        calibrate_model_routers(model, samples["server"])
        if self.params.router == "global":
            # The flattened router only fits the server's resolution: fail now, with its own
            # message, rather than after the warm-up (see configs/global_router_fails.yaml).
            with torch.no_grad():
                for img in samples.values():
                    model.eval()(img)

    def server_plan(self, rnd: int) -> ServerPlan:
        return ServerPlan(extra_loss=self.extra_loss if self._has_extra_loss else None)

    @property
    def _routes_by_resolution(self) -> bool:
        return self.params.route_by == "resolution" and self.params.route_coef > 0

    @property
    def _routes_by_client(self) -> bool:
        return self.params.route_by == "client"

    @property
    def _has_extra_loss(self) -> bool:
        return self.params.balance_coef > 0 or self._routes_by_resolution or self._routes_by_client

    def client_expert(self, client_id: int) -> int:
        """The expert client ``client_id`` trains under client routing (expert 0 is the server's)."""
        return 1 + client_id % (self.params.num_experts - 1)

    def resolution_group(self, head: MoEDetect) -> list[int]:
        """The experts the last forward's input should route to: the first half for inputs at least
        as wide as the geometric mean of the server's and clients' widths, the second half otherwise."""
        k = self.params.num_experts
        width = head.last_expert_index[0].shape[-1] * float(head.stride[0])
        low = width < self.cfg.data.width * self.cfg.data.client_scale**0.5
        return list(range(k // 2, k)) if low else list(range(k // 2))

    def server_metrics(self, model: nn.Module) -> dict[str, float]:
        fractions = moe_head(model).routing_fractions().tolist()
        return {f"routing/expert_{k}": f for k, f in enumerate(fractions)}

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        p = self.params
        if not self._has_extra_loss:
            return None
        loss = moe_aux_loss(model) if p.balance_coef > 0 else torch.zeros(())
        if self._routes_by_resolution:
            head = moe_head(model)
            loss = loss + p.route_coef * group_routing_loss(head, self.resolution_group(head))
        if self._routes_by_client and p.route_coef > 0:
            head = moe_head(model)
            target = 0 if head.force_expert is None else head.force_expert  # the server trains unforced
            loss = loss + p.route_coef * group_routing_loss(head, [target])
        return loss

    def client_loss_terms(self, model: nn.Module, received: dict[str, torch.Tensor], rnd: int) -> torch.Tensor | None:
        return self.extra_loss(model)

    def begin_training(self, model: nn.Module, client_id: int | None = None) -> None:
        head = moe_head(model)
        head.reset_routing_stats()
        if self._routes_by_client:
            head.force_expert = None if client_id is None else self.client_expert(client_id)
            head.average_experts = client_id is None

    def client_metrics(self, model: nn.Module) -> dict[str, float]:
        counts = moe_head(model).routing_counts.tolist()
        return {f"routing/count_{k}": float(c) for k, c in enumerate(counts)}

    def aggregate(self, global_state: State, results: list[ClientResult], rnd: int) -> State:
        averaged = super().aggregate(global_state, results, rnd)
        k = self.params.num_experts
        if self._routes_by_client:  # a client trained its own expert only
            usage = np.array([np.eye(k)[self.client_expert(r.client_id)] for r in results])
            averaged.update(self._usage_weighted_experts(global_state, results, usage))
        elif self.params.usage_weighting:
            usage = np.array([_routing_counts(r, k) for r in results])
            averaged.update(self._usage_weighted_experts(global_state, results, usage))
        return mix(global_state, averaged, self.params.alpha)

    def _usage_weighted_experts(self, global_state: State, results: list[ClientResult], usage: np.ndarray) -> State:
        """Each expert's slice averaged over the clients that used it, weighted by ``n_i * share``
        (``usage``: clients x experts); an expert nobody used keeps its global value."""
        k = self.params.num_experts
        share = usage / np.maximum(usage.sum(1, keepdims=True), 1)
        weights = share * np.array([r.num_samples for r in results], float)[:, None]  # (clients, K)
        out: State = {}
        for key in _expert_keys(global_state):
            merged = global_state[key].astype(np.float64).copy()
            for e in range(k):
                if weights[:, e].sum() > 0:
                    w = weights[:, e] / weights[:, e].sum()
                    merged[e] = sum(wi * r.update[key][e].astype(np.float64) for wi, r in zip(w, results, strict=True))
            out[key] = merged.astype(global_state[key].dtype)
        return out

    def round_metrics(self, results: list[ClientResult], domains: dict[int, str]) -> dict[str, float]:
        """Fraction of locations each client domain routed to each expert in this round, and how
        specialised routing is: ``routing/mi_bits``, the mutual information between a location's
        client domain and its expert (0: every domain routes alike; log2 of the number of domains:
        each domain has experts of its own).

        A round often holds one domain (r = 0.33 at N = 3 samples one client), and one domain alone
        always gives 0 bits. So the figure is over every domain seen so far, each with the shares of
        the last round it trained in, weighted equally; those shares are checkpointed state.
        """
        k = self.params.num_experts
        per_domain: dict[str, np.ndarray] = {}
        for r in results:
            counts = _routing_counts(r, k)
            per_domain[domains[r.client_id]] = per_domain.get(domains[r.client_id], 0) + counts
        out = {}
        for domain, counts in per_domain.items():
            if counts.sum() <= 0:
                continue
            shares = counts / counts.sum()
            self._latest_shares[domain] = shares.tolist()
            for e, share in enumerate(shares):
                out[f"routing/{domain}/expert_{e}"] = float(share)
            if self.params.route_by == "resolution":  # the clients' inputs are low-res: the second half
                out[f"routing/{domain}/low_group"] = float(shares[k // 2 :].sum())
        if self._latest_shares:
            out["routing/mi_bits"] = mutual_information(np.array(list(self._latest_shares.values())))
            out["routing/domains_seen"] = float(len(self._latest_shares))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"latest_shares": {d: list(v) for d, v in self._latest_shares.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._latest_shares = {d: list(v) for d, v in state.get("latest_shares", {}).items()}


def mutual_information(counts: np.ndarray) -> float:
    """I(row; column) in bits of a contingency table of counts (rows: domains, columns: experts)."""
    joint = counts / max(counts.sum(), 1)
    rows, cols = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (rows @ cols)[nz])).sum())
