"""The cluster's nodes: can each reach the run's storage, and how many client actors fit on each.

Before a run's driver starts, one zero-CPU task per alive node (pinned there with a hard node
affinity) reads what a client or the driver will read (the partition manifest, the start
weights) and writes a probe file where the run writes. A node that cannot fails the run at once
with ``StorageUnreachable`` naming the node and the path, instead of a ``FileNotFoundError`` from an
actor rounds later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private.state import available_resources_per_node
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class StorageUnreachable(RuntimeError):
    """A node of the cluster cannot read the run's inputs or write its directory."""


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str


def alive_nodes() -> list[Node]:
    return sorted(
        (Node(n["NodeID"], n.get("NodeManagerAddress", "?")) for n in ray.nodes() if n.get("Alive")),
        key=lambda n: n.node_id,
    )


def on_node(node_id: str, soft: bool = False) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)


def _problems(read: list[str], write_dir: str) -> list[str]:
    found = []
    for path in read:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            found.append(f"cannot read {path} ({exc.strerror or exc})")
    probe = Path(write_dir) / f".node-probe-{os.getpid()}"
    try:
        Path(write_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        found.append(f"cannot write {write_dir} ({exc.strerror or exc})")
    return found


_probe = ray.remote(num_cpus=0, max_retries=0)(_problems)


def check_storage(read: list[Path], write_dir: Path, timeout_s: float = 120) -> list[Node]:
    """Every alive node reads ``read`` and writes in ``write_dir``, or ``StorageUnreachable``; the nodes."""
    nodes = alive_nodes()
    refs = [
        _probe.options(scheduling_strategy=on_node(n.node_id)).remote([str(p) for p in read], str(write_dir))
        for n in nodes
    ]
    lines = []
    for node, answer in zip(nodes, ray.get(refs, timeout=timeout_s), strict=True):
        lines += [f"fedsim: node {node.node_id[:12]} ({node.address}) {p}" for p in answer]
    if lines:
        hint = "set FEDSIM_STORAGE to a path every node mounts (see README, 'On a cluster')"
        raise StorageUnreachable("\n".join([*lines, f"fedsim: {hint}"]))
    return nodes


def free_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources (``CPU``, ``GPU``, ``memory``, ...)."""
    alive = {n.node_id for n in alive_nodes()}
    return {k: v for k, v in available_resources_per_node().items() if k in alive}
