"""The search space of an Optuna search from Hydra's sweep syntax, as hydra-optuna-sweeper reads it.

``model.lr='tag(log, interval(1e-4,1e-2))'`` is a log-uniform float, ``interval(a, b)`` a uniform one (integer
bounds: an integer), ``choice(...)`` a categorical, ``range(a, b, step)`` the values of Hydra's range (``b`` excluded); ``key=value`` fixes the key
(the command line wins over the preset's ``hydra.sweeper.params``). Written for Optuna 3+ distributions
(``FloatDistribution``/``IntDistribution``) with the semantics of hydra-optuna-sweeper 1.2's ``_impl.py``, so a search
space typed for it means the same here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

__all__ = ["distribution", "search_space"]


def _choices(override: Override) -> CategoricalDistribution:
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    for value in choices:
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise ValueError(
                f"{override.input_line}: a choice takes str, int, float, bool or null values, not {value!r}"
            )
    return CategoricalDistribution(choices)


def distribution(override: Override) -> BaseDistribution | str:
    """The Optuna distribution of a sweep override, or the value (as typed) of a plain ``key=value``."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        return _choices(override)
    if override.is_range_sweep():
        if value.shuffle:
            return _choices(override)
        # Hydra's range excludes its stop (range(0,12,4) is 0, 4, 8); hydra-optuna-sweeper searched up to the stop.
        values = list(override.sweep_iterator())
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(values[0], values[-1], step=value.step)
        return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ValueError(f"{override.input_line}: the Optuna search takes choice(), range() or interval() sweeps")


def search_space(lines: Iterable[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """The searched keys with their distributions and the fixed keys with their values, from override lines in
    order (a later line for the same key wins, so the command line overrides the preset)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(lines)):
        key = override.get_key_element()
        value = distribution(override)
        space.pop(key, None)
        fixed.pop(key, None)
        if isinstance(value, BaseDistribution):
            space[key] = value
        else:
            fixed[key] = value
    return space, fixed
