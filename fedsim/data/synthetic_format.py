"""``data.format: synthetic``: the embedded procedural driving scenes, generated to the split's size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedsim.config import DataConfig
from fedsim.data.partition import Partition, build_partition, domain_test_size
from fedsim.data.synthetic import DOMAINS, SynthSpec, generate


def _counts(data: DataConfig) -> dict[str, int]:
    # A domain without a test size gets none here; split_problems then says so.
    per_server = -(-data.server_images // len(data.server_domains))
    counts = {d: (domain_test_size(data, d) or 0) + per_server for d in data.server_domains}
    counts.update({d: (domain_test_size(data, d) or 0) + data.client_images for d in data.client_domains})
    return counts


def config_problems(data: DataConfig) -> list[str]:
    problems = []
    for where, domains in (("data.server_domains", data.server_domains), ("data.client_domains", data.client_domains)):
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown:
            problems.append(f"{where}: unknown synthetic domain(s) {unknown}; known: {sorted(DOMAINS)}")
    return problems


def available_images(data: DataConfig) -> dict[str, int]:
    """Exactly what the split needs, for every known domain (the generator renders on demand)."""
    return {d: n for d, n in _counts(data).items() if d in DOMAINS}


def prepare(data: DataConfig, num_clients: int, cache_root: Path, echo: Callable[[str], None] = print) -> Partition:
    """Generate exactly the images the split needs, then split them."""
    counts = _counts(data)
    spec = SynthSpec(images_per_domain=counts, width=data.width, height=data.height, seed=data.seed)
    source = generate(spec, cache_root)
    domain_images = {d: sorted((source / d / "images").glob("*.jpg")) for d in counts}
    return build_partition(domain_images, data, num_clients, cache_root, source_key=spec.key())
