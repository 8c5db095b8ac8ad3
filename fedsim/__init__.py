"""fedsim: practical semi-supervised federated learning (PSSFL) simulation on Ray."""

from fedsim import offline as _offline

_offline.apply()

__version__ = "0.1.0"
