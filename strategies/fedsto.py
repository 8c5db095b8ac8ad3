"""FedSTO (Kim et al., NeurIPS 2023): selective training, then full training with orthogonal enhancement.

Phase 1 (rounds 1..phase1_rounds): clients train and upload only the *backbone side* of the
trainable part, the server trains everything. FedSTO's backbone is frozen here (it is the
foundation model), so the part that plays its role is the **neck** (layers between the backbone
and the Detect head): the clients adapt features to their domain while the head, which is what
noisy pseudo-labels hurt most, stays the server's. ``selective: head`` flips that choice.
Phase 2: clients train the whole trainable part; server and clients add the orthogonality
penalty ``sum_W sigma(W^T W - I) + sigma(W W^T - I)`` (sigma = spectral norm) over the neck/head
conv weights, each flattened to ``(out, in * k * k)``. The local EMA teacher is the client's
default pseudo-labeler in fedsim already.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedsim.model.detector import backbone_size, trainable_keys
from fedsim.types import ServerPlan
from strategies.base import Strategy


class FedSTOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase1_rounds: int = Field(3, ge=0)
    orth_coef: float = Field(0.001, ge=0.0)
    selective: Literal["neck", "head"] = "neck"  # what clients train in phase 1
    power_iters: int = Field(3, ge=1)


def _sym_spectral_norm(matvec, dim: int, iters: int | None, generator: torch.Generator) -> torch.Tensor:
    """Largest |eigenvalue| of a symmetric operator; exact (via its matrix) when ``iters`` is None."""
    if iters is None:
        eye = torch.eye(dim)
        return torch.linalg.eigvalsh(matvec(eye)).abs().max()
    v = torch.randn(dim, 1, generator=generator)
    for _ in range(iters):
        with torch.no_grad():
            v = matvec(v)
            v = v / v.norm().clamp_min(1e-12)
    return (v * matvec(v)).sum().abs()  # Rayleigh quotient at the converged direction, differentiable


def orthogonality_penalty(weight: torch.Tensor, iters: int | None = None, seed: int = 0) -> torch.Tensor:
    """``sigma(W^T W - I) + sigma(W W^T - I)`` for one weight, flattened to ``(out, fan_in)``."""
    m = weight.reshape(weight.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    right = _sym_spectral_norm(lambda v: m.T @ (m @ v) - v, m.shape[1], iters, g)
    left = _sym_spectral_norm(lambda u: m @ (m.T @ u) - u, m.shape[0], iters, g)
    return right + left


def model_orthogonality(model: nn.Module, iters: int) -> torch.Tensor:
    n = backbone_size(model)
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() >= 2 and int(name.split(".")[1]) >= n:
            total = total + orthogonality_penalty(p, iters)
    return total


class FedSTO(Strategy):
    name = "fedsto"
    Params = FedSTOParams

    def _phase(self, rnd: int) -> int:
        return 1 if rnd <= self.params.phase1_rounds else 2

    def travelling_keys(self, model: nn.Module, rnd: int) -> list[str]:
        keys = trainable_keys(model)
        if self._phase(rnd) == 2:
            return keys
        head = len(model.model) - 1
        in_head = [k for k in keys if int(k.split(".")[1]) == head]
        return [k for k in keys if k not in in_head] if self.params.selective == "neck" else in_head

    def client_loss_terms(self, model: nn.Module, received: dict[str, torch.Tensor], rnd: int) -> torch.Tensor | None:
        if self._phase(rnd) == 1 or self.params.orth_coef == 0:
            return None
        return self._orthogonality(model)

    def server_plan(self, rnd: int) -> ServerPlan:
        if rnd > 0 and self._phase(rnd) == 2 and self.params.orth_coef > 0:
            return ServerPlan(extra_loss=self._orthogonality)
        return ServerPlan()

    def _orthogonality(self, model: nn.Module) -> torch.Tensor:
        return self.params.orth_coef * model_orthogonality(model, self.params.power_iters)
