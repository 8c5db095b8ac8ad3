"""The Ray cluster a sweep runs on: an existing one if there is one, else a local one sized for it.

Ray's CPUs are logical. A tiny trial reserves 1 CPU for its own process plus 1 per client
actor (the device profile's request, which the client actors make and which their bundles must
therefore hold): 3 CPUs for ``tiny.yaml``. On a 2-core machine not even one trial would fit, so
the local cluster declares ``max_concurrent_trials`` trials' worth of logical CPUs and lets the
OS share the physical cores. That oversubscribes the CPU (trials run slower), but it is only a
simulation's bookkeeping: the placement group still reserves every trial's client actors up
front, so no trial can start without its pool and then wait forever for it.
"""

from __future__ import annotations

import math
import os

import ray

from fedsim.experiment import init_ray


def needed_cpus(bundles: list[dict[str, float]], concurrent: int) -> int:
    return math.ceil(sum(b.get("CPU", 0.0) for b in bundles) * concurrent)


def start(bundles: list[dict[str, float]], concurrent: int) -> bool:
    """Connect to or start Ray; True if this call did (so the caller shuts it down)."""

    return init_ray(num_cpus=max(os.cpu_count() or 1, needed_cpus(bundles, concurrent)))


def check_fits(bundles: list[dict[str, float]]) -> None:
    """Fail fast if one trial's placement group can never be placed (Tune would wait forever)."""

    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    short = {k: v for k, v in need.items() if v > total.get(k, 0.0)}
    if short:
        have = {k: total.get(k, 0.0) for k in short}
        raise RuntimeError(
            f"sweep: one trial needs {short} but the cluster has {have} in total; "
            "lower clients.num_clients / clients.max_actors or use a smaller device profile"
        )
