"""The proximal term ``mu/2 * ||w - w_anchor||^2``: FedProx's client term, and the server's
optional pull towards the round's aggregate (``train.server_prox``)."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.types import ExtraLoss


def proximal_term(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """``mu / 2 * sum ||w - w_anchor||^2`` over parameters that train and have an anchor value."""
    total = torch.zeros(())
    for name, param in model.named_parameters():
        if param.requires_grad and name in anchor:
            total = total + (param - anchor[name].to(param.dtype)).pow(2).sum()
    return 0.5 * mu * total


def trainable_anchor(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter that trains: where a proximal term pulls back to."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def with_proximal(extra_loss: ExtraLoss | None, anchor: dict[str, torch.Tensor], mu: float) -> ExtraLoss:
    """``extra_loss`` (the strategy's, if any) plus ``proximal_term(model, anchor, mu)``."""

    def combined(model: nn.Module) -> torch.Tensor:
        own = extra_loss(model) if extra_loss else None
        prox = proximal_term(model, anchor, mu)
        return prox if own is None else own + prox

    return combined
