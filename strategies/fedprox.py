"""FedProx (Li et al., 2020): FedAvg plus ``mu/2 * ||w - w_t||^2`` on the trainable parameters."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedsim.train.proximal import proximal_term
from strategies.base import Strategy


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.001, ge=0.0)  # the value the PSSFL reference implementation uses


class FedProx(Strategy):
    name = "fedprox"
    Params = FedProxParams

    def client_loss_terms(self, model: nn.Module, received: dict[str, torch.Tensor], rnd: int) -> torch.Tensor | None:
        return proximal_term(model, received, self.params.mu) if self.params.mu > 0 else None
