"""The driver's end of compressed uplinks: decode results, and keep each client's top-k residual.

Error feedback needs memory on the device (what top-k did not send yet). Client actors keep
nothing between jobs, so the driver keeps it on the devices' behalf: a job carries its client's
residual, the result brings the new one back, and neither counts as a transfer (a real device
would hold it in its own memory). Only a kept client's residual is replaced; a straggler's or a
failed client's update never reached the aggregate, so it keeps the residual it had.

The store is part of every round checkpoint (``state_dict``: tensors keyed by client id), so a
resumed run sends exactly what an uninterrupted one sent. It holds one float32 array per entry with
something left in it, per client sampled so far: O(clients seen x travelling state) at most.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.compression import decode
from fedsim.config import CompressionConfig
from fedsim.types import ClientResult, State


class Uplink:
    def __init__(self, cfg: CompressionConfig):
        self.cfg = cfg
        self.residuals: dict[int, State] = {}

    @property
    def compressed(self) -> bool:
        return self.cfg.uplink != "none"

    def residual_of(self, client_id: int) -> State | None:
        return self.residuals.get(client_id) if self.cfg.uplink == "topk" else None

    def receive(self, kept: list[ClientResult], received: State) -> None:
        """Decode every kept result's payload into its ``update`` and file its new residual."""
        for r in kept:
            if r.payload is None:
                continue
            r.update = decode(r.payload, received, self.cfg)
            r.payload = None
            if self.cfg.uplink == "topk":
                if r.residual:
                    # own copies: arrays read from Ray's object store would pin the whole result there
                    self.residuals[r.client_id] = {k: np.array(v) for k, v in r.residual.items()}
                else:
                    self.residuals.pop(r.client_id, None)
            r.residual = None

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {str(c): {k: torch.from_numpy(v.copy()) for k, v in s.items()} for c, s in self.residuals.items()}

    def load_state_dict(self, blob: dict[str, dict[str, torch.Tensor]]) -> None:
        self.residuals = {int(c): {k: np.asarray(v.numpy()) for k, v in s.items()} for c, s in blob.items()}
