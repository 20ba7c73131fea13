"""Localization metrics: per-image scores, their DDP-exact mean (:class:`LocalizationMetrics`) and the registry
every table reads its metric list from.

The study's four metrics live in :mod:`.core`. Another metric is one module in this package (found without an
import list) with a ``@register_metric(name, label, description)`` function ``ScoreInputs -> per-image values``;
see docs/extending.md.
"""

from deeploc.metrics.core import *  # noqa: F403
from deeploc.metrics.core import __all__  # noqa: F401
