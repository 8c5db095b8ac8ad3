"""Device profiles: what a simulated device may use, how fast it computes and how fast its link is.

A profile has two jobs. Its ``num_cpus``/``num_gpus``/``memory_gib`` become Ray resource requests
for the client actors, and ``memory_gib`` is also the per-job memory budget checked in the actor
(Ray's resources are logical: they decide where an actor may start, not what it may use, so the
budget is measured per job, see ``client.py``). Its ``speed``, ``up_mbps`` and ``down_mbps`` only
feed the virtual clock (``clock.py``): heterogeneity is simulated, never throttled.

Clients mix profiles with ``clients.profile``: one name for every client, or a list of names
assigned round-robin by client id (client ``i`` gets ``profile[i % len(profile)]``). Round-robin
needs no per-client table, so it costs nothing at N = 100 000, and a client's profile never
depends on sampling. ``clients.profiles`` adds user profiles (or overrides built-in ones).

One pool serves every profile. Its actors reserve the element-wise maximum of the profiles in
use (``pool_profile``), so any actor can serve any client; the job carries its own profile's
budget and thread count. One pool per profile would leave a rarely sampled profile's actors
idle most rounds, and since the resources only shape admission, a bigger reservation than a
light device needs changes nothing about its simulated behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceProfile:
    num_cpus: float
    num_gpus: float
    memory_gib: float  # budget per job; also Ray's logical memory reservation
    threads: int = 1  # torch intra-op threads for this device's jobs
    speed: float = 1.0  # compute relative to this machine's reference (1.0), see clock.py
    up_mbps: float = 1000.0  # uplink, megabits per second
    down_mbps: float = 1000.0  # downlink

    @property
    def budget_mib(self) -> float:
        return self.memory_gib * 1024


PROFILES: dict[str, DeviceProfile] = {
    "cpu-1": DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=2.0),
    "cpu-2": DeviceProfile(num_cpus=2, num_gpus=0, memory_gib=4.0, threads=2),
    "rpi-2gb": DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=2.0, speed=0.15, up_mbps=10, down_mbps=50),
    "jetson-4gb": DeviceProfile(num_cpus=1, num_gpus=0.25, memory_gib=4.0, speed=0.5, up_mbps=20, down_mbps=100),
    "phone-6gb": DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=6.0, speed=0.3, up_mbps=10, down_mbps=40),
    "gpu-quarter": DeviceProfile(num_cpus=1, num_gpus=0.25, memory_gib=8.0),
}


def known_profiles(custom: dict[str, Any] | None = None) -> dict[str, DeviceProfile]:
    """Built-in profiles plus ``clients.profiles`` (pydantic models or plain dicts); custom wins."""
    out = dict(PROFILES)
    for name, spec in (custom or {}).items():
        fields = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
        out[name] = DeviceProfile(**fields)
    return out


class ProfileAssignment:
    """Client id -> (profile name, profile), round-robin over ``clients.profile``; O(#profiles) memory."""

    def __init__(self, names: str | list[str], profiles: dict[str, DeviceProfile]):
        self.names = [names] if isinstance(names, str) else list(names)
        if not self.names:
            raise ValueError("clients.profile needs at least one profile name")
        unknown = sorted({n for n in self.names if n not in profiles})
        if unknown:
            raise ValueError(f"unknown device profile(s) {unknown}; known: {sorted(profiles)}")
        self.profiles = {n: profiles[n] for n in self.names}

    @classmethod
    def from_config(cls, clients) -> ProfileAssignment:
        return cls(clients.profile, known_profiles(clients.profiles))

    def name_of(self, client_id: int) -> str:
        return self.names[client_id % len(self.names)]

    def of(self, client_id: int) -> DeviceProfile:
        return self.profiles[self.name_of(client_id)]

    def pool_profile(self) -> DeviceProfile:
        return pool_profile(list(self.profiles.values()))


def pool_profile(profiles: list[DeviceProfile]) -> DeviceProfile:
    """What one pool actor reserves so that it can serve a job of any of ``profiles``."""
    most = {k: max(getattr(p, k) for p in profiles) for k in ("num_cpus", "num_gpus", "memory_gib", "threads")}
    return DeviceProfile(**most)


def actor_options(profile: DeviceProfile) -> dict:
    return {
        "num_cpus": profile.num_cpus,
        "num_gpus": profile.num_gpus,
        "memory": int(profile.memory_gib * 2**30),
    }


def _fits(profile: DeviceProfile, resources: dict[str, float]) -> int:
    """How many actors of ``profile`` fit in ``resources``."""
    fits = [math.floor(resources.get("CPU", 0) / profile.num_cpus)] if profile.num_cpus else []
    if profile.num_gpus:
        fits.append(math.floor(resources.get("GPU", 0) / profile.num_gpus))
    fits.append(math.floor(resources.get("memory", float("inf")) / (profile.memory_gib * 2**30)))
    return max(0, min(fits))


def _none_fits(profile: DeviceProfile, resources: object) -> RuntimeError:
    return RuntimeError(
        f"no client actor fits: profile needs {profile.num_cpus} CPU, {profile.num_gpus} GPU, "
        f"{profile.memory_gib} GiB; cluster has {resources}"
    )


def place_pool(
    profile: DeviceProfile, per_node: dict[str, dict[str, float]], wanted: int, cap: int | None = None
) -> list[str]:
    """A node id per pool actor: each node holds at most what fits in its own free resources.

    Sized per node because an actor is placed on one node: cluster-wide totals would count two
    half-free nodes as one whole one. Actors are dealt one node at a time (the nodes in id order),
    so a pool smaller than the cluster still spreads over every node that has room.
    """
    room = {node: _fits(profile, free) for node, free in sorted(per_node.items())}
    target = min([wanted, sum(room.values())] + ([cap] if cap else []))
    if target < 1:
        raise _none_fits(profile, per_node)
    slots: list[str] = []
    while len(slots) < target:
        for node, left in room.items():
            if left and len(slots) < target:
                slots.append(node)
                room[node] = left - 1
    return slots
