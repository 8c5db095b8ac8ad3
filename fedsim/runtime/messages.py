"""What travels between the driver and the client actors.

A job is everything a client needs besides the round's global state, which travels once per
round through the object store; so any actor can serve any client, whatever its device profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClientJob:
    client_id: int
    round: int
    images: str  # the client's unlabeled shard (a folder of low-resolution images)
    imgsz: int
    seed: int  # derived from (root seed, round, client): results do not depend on scheduling
    settings: dict[str, Any]
    threads: int | None = None  # the device profile's torch threads (None: the actor's default)
    budget_mib: float | None = None  # the device profile's memory budget (None: the actor's default)


@dataclass
class ClientResult:
    client_id: int
    round: int
    update: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientFailure:
    client_id: int
    round: int
    error: str
