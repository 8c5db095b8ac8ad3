"""Device profiles -> Ray actor options, and how many client actors the cluster holds.

Ray's resources are logical: they decide where an actor may start, not what it may use. The
memory budget is therefore also measured per job (see ``client.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    num_cpus: float
    num_gpus: float
    memory_gib: float  # budget per job; also Ray's logical memory reservation
    threads: int = 1  # torch intra-op threads in the actor


PROFILES: dict[str, DeviceProfile] = {
    "cpu-1": DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=2.0),
    "cpu-2": DeviceProfile(num_cpus=2, num_gpus=0, memory_gib=4.0, threads=2),
    "rpi-2gb": DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=2.0),
    "jetson-4gb": DeviceProfile(num_cpus=1, num_gpus=0.25, memory_gib=4.0),
    "gpu-quarter": DeviceProfile(num_cpus=1, num_gpus=0.25, memory_gib=8.0),
}


def actor_options(profile: DeviceProfile) -> dict:
    return {
        "num_cpus": profile.num_cpus,
        "num_gpus": profile.num_gpus,
        "memory": int(profile.memory_gib * 2**30),
    }


def pool_size(profile: DeviceProfile, resources: dict[str, float], wanted: int, cap: int | None = None) -> int:
    """Actors that fit in ``resources`` (``ray.available_resources()``), at most ``wanted``/``cap``."""
    fits = [math.floor(resources.get("CPU", 0) / profile.num_cpus)] if profile.num_cpus else []
    if profile.num_gpus:
        fits.append(math.floor(resources.get("GPU", 0) / profile.num_gpus))
    fits.append(math.floor(resources.get("memory", float("inf")) / (profile.memory_gib * 2**30)))
    n = min([wanted, *(f for f in fits)] + ([cap] if cap else []))
    if n < 1:
        raise RuntimeError(
            f"no client actor fits: profile needs {profile.num_cpus} CPU, {profile.num_gpus} GPU, "
            f"{profile.memory_gib} GiB; cluster has {resources}"
        )
    return n
