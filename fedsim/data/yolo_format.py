"""``data.format: yolo``: any YOLO-format data set split by domain (folders or a manifest CSV)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fedsim.config import DataConfig
from fedsim.data.partition import Partition, build_partition
from fedsim.data.yolo_folder import DomainIndex, load_domain_index
from fedsim.storage import resolve


def config_problems(data: DataConfig) -> list[str]:
    return [] if data.root is not None else ["data: format 'yolo' needs data.root"]


def index(data: DataConfig) -> DomainIndex:
    """Every image validated against its label file; raises ``DataError`` when unusable."""
    manifest = resolve(data.manifest) if data.manifest is not None else None
    return load_domain_index(resolve(data.root), manifest=manifest, num_classes=len(data.classes), on_bad=data.on_bad)


def available_images(data: DataConfig) -> dict[str, dict[str, int]]:
    """Images per domain and manifest split (``train``/``test``/``any``), as ``split_problems`` reads them."""
    found = index(data)
    return {d: dict(Counter(found.splits.get(p, "any") for p in paths)) for d, paths in found.images.items()}


def prepare(data: DataConfig, num_clients: int, cache_root: Path, echo: Callable[[str], None] = print) -> Partition:
    found = index(data)
    if found.problems:
        echo(f"data: skipped {len(found.problems)} image(s) with problems:\n{found.summary()}")
    # The cache key follows the files themselves and where the manifest puts them (domain, split),
    # so an edited data set or manifest is split anew.
    files = sorted((p, d) for d, images in found.images.items() for p in images)
    fingerprint = hashlib.sha1(
        "".join(
            f"{p}:{d}:{found.splits.get(p, 'any')}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p, d in files
        ).encode()
    )
    return build_partition(
        found.images,
        data,
        num_clients,
        cache_root,
        source_key=f"yolo:{resolve(data.root)}:{fingerprint.hexdigest()[:12]}",
        splits=found.splits,
    )
