"""Centralized baselines: no clients, the server trains alone on labels, with FL's epoch budget.

- ``scl_frozen``: supervised on the server's labeled high-res data, frozen backbone; warm-up plus
  ``rounds x server_epochs`` epochs, exactly the supervised epochs a federated run gets.
- ``scl_full``: the same with the whole model training (backbone included).
- ``server_only``: the warm-up model alone (no rounds).
- ``oracle``: supervised on *all* labels, the server's and the clients' true ones, frozen
  backbone: the upper bound PSSFL cannot reach. Each holder's images train at their own
  resolution (every batch comes from one of them), as they would in FL and as they are tested:
  upscaling the clients' low-res images to the server's size teaches objects at the wrong scale.
  Only the server's batches set BatchNorm statistics, as in FL (``ResolutionGroups``).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from fedsim.types import ServerPlan
from strategies.base import Strategy


class SCLFrozen(Strategy):
    name = "scl_frozen"
    uses_clients: ClassVar[bool] = False


class SCLFull(SCLFrozen):
    name = "scl_full"

    def build_model(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        for name, p in model.named_parameters():
            if ".dfl." in name:  # the fixed distribution-to-distance projection
                p.requires_grad_(False)
        return model

    def state_keys(self, model: nn.Module) -> list[str]:
        return list(model.state_dict())

    def server_plan(self, rnd: int) -> ServerPlan:
        return ServerPlan(frozen_backbone=False)


class ServerOnly(SCLFrozen):
    name = "server_only"

    def num_rounds(self) -> int:
        return 0


class Oracle(SCLFrozen):
    name = "oracle"

    def server_plan(self, rnd: int) -> ServerPlan:
        return ServerPlan(labeled="server+clients")
