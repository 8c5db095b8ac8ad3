"""Hyperparameter sweeps: Ray Tune + Optuna over whole simulations, recorded in MLflow.

``fedsim`` is imported first so its offline variables (proxy block for Ray's start-up probe,
Ultralytics offline) are set before any submodule imports Ray.
"""

import fedsim  # noqa: F401
