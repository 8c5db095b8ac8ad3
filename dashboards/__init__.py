"""Run comparison from MLflow: a static HTML report, and a launcher for the MLflow UI.

``fedsim`` is imported first so its offline variables are set in every entry point.
"""

import fedsim  # noqa: F401
