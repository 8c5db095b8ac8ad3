"""Keep every fedsim process off the network and Ultralytics quiet.

Imported first by ``fedsim/__init__.py`` so the variables are in place before Ultralytics
or Ray is imported anywhere (CLI, driver actor, client actors, tests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedsim.storage import cache_dir

# Ray's head probes cloud metadata at start; pointing HTTP at a closed loopback port makes
# that probe fail locally instead of leaving the machine.
RAY_LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "http_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
    "NO_PROXY": "127.0.0.1,localhost",
}

ULTRALYTICS_OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_VERBOSE": "false",
}


def offline_env() -> dict[str, str]:
    """The variables every worker process needs, for Ray runtime_env ``env_vars``."""
    env = {**RAY_LOOPBACK_ENV, **ULTRALYTICS_OFFLINE_ENV}
    env["YOLO_CONFIG_DIR"] = os.environ.get("YOLO_CONFIG_DIR", str(cache_dir() / "ultralytics"))
    env["FEDSIM_CACHE"] = str(cache_dir())
    return env


def _place_font(config_dir: Path) -> None:
    # Ultralytics' dataset checks download Arial.ttf when it is missing; any TTF under that
    # name satisfies them, and matplotlib (an Ultralytics dependency) ships DejaVuSans.
    target = config_dir / "Ultralytics"
    if (target / "Arial.ttf").exists() and (target / "Arial.Unicode.ttf").exists():
        return
    try:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (target / name).exists():
                shutil.copyfile(source, target / name)
    except (ImportError, OSError):
        pass


def apply() -> None:
    """Set the offline variables (user settings win) and place the font Ultralytics wants."""
    for key, value in offline_env().items():
        os.environ.setdefault(key, value)
    _place_font(Path(os.environ["YOLO_CONFIG_DIR"]))
