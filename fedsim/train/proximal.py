"""The proximal term ``mu/2 * ||w - w_anchor||^2``: FedProx's client term, and the server's
optional pull towards the round's aggregate (``train.server_prox``)."""

from __future__ import annotations

import torch
from torch import nn


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
