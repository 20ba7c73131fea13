"""How a test subset relates to a run's training, in the words every printout uses (train, eval, export, report).

In ``cross`` and ``in_domain`` runs ``subset`` is the training subset: testing on it is in-domain, on any other
subset out-of-domain. In ``leave_one_out`` runs ``subset`` is the HELD-OUT subset, never trained on: testing on it
is the held-out score, on the other subsets a seen-subset score (protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LOO = "leave_one_out"


def subset_role(split: str, subset: str, test_subset: str) -> str:
    """The role of `test_subset`: in-domain / out-of-domain (cross, in_domain), held out / seen (leave_one_out)."""
    if split == LOO:
        return "held out" if test_subset == subset else "seen"
    return "in-domain" if test_subset == subset else "out-of-domain"


def training_phrase(split: str, subset: str, subsets: Sequence[str] | None = None) -> str:
    """`trained on lama`, or `trained on ldm, lama, pluralistic (held out: repaint-p2-9k)` for leave_one_out."""
    if split != LOO:
        return f"trained on {subset}"
    seen = [s for s in subsets or [] if s != subset]
    return f"trained on {', '.join(seen) if seen else 'the other subsets'} (held out: {subset})"


def describe_training(config: Mapping[str, Any]) -> str:
    """`training_phrase` of a metrics.json ``config``, with its split mode; "" when the config names no subset."""
    if not config.get("subset"):
        return ""
    split = str(config.get("split", "?"))
    return f"{split} split, {training_phrase(split, str(config['subset']), config.get('subsets'))}"
