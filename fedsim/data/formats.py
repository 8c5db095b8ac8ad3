"""``data.format`` -> the module that turns such a data set into the PSSFL partition.

Each format module offers three functions:

- ``config_problems(data) -> list[str]``: what is wrong with ``data`` for this format, as config
  error lines (``data.root`` missing, unknown domains, ...);
- ``available_images(data) -> dict[str, int | dict[str, int]]``: images per domain (or per domain
  and manifest split ``train``/``test``/``any``), without writing anything (``fedsim check``
  compares them with the split the config asks for; the index and label checks of a real data
  set run here, so bad files are named before Ray starts);
- ``prepare(data, num_clients, cache_root, echo) -> Partition``: build (or find cached) the split.

Add a format with one file and one line in ``FORMATS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from fedsim.config import DataConfig
from fedsim.data.partition import Partition

FORMATS: dict[str, str] = {
    "synthetic": "fedsim.data.synthetic_format",
    "yolo": "fedsim.data.yolo_format",
}


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; valid: {', '.join(sorted(FORMATS))}")
    return importlib.import_module(FORMATS[name])


def available_images(data: DataConfig) -> dict[str, int | dict[str, int]]:
    return format_module(data.format).available_images(data)


def prepare_partition(
    data: DataConfig, num_clients: int, cache_root: Path, echo: Callable[[str], None] = print
) -> Partition:
    return format_module(data.format).prepare(data, num_clients, cache_root, echo)
