"""Golden results: tiny real jobs through deeploc's CLIs give, bit for bit, the results recorded in
tests/golden/golden.json (the scenarios: tests/golden/scenarios.py).

Each scenario's metrics and evaluation numbers, per-epoch logs, per-image scores and checkpoint state-dict digests
must EQUAL the recorded ones (no tolerance: on the machine type and libraries they were recorded with, the same code
gives the same bits; golden.json's ``environment`` says which). Overlay pixels are compared in their own test, so a
deliberate redesign of the overlays re-records them alone.

Re-record (only for an intended change of results; say why in the commit), from the repository root::

    python -m tests.golden.record                 # every scenario
    python -m tests.golden.record multihead eval  # only these; the others are kept

The scenarios run once per session, on demand (about 65 s for all of them on an idle 2-core machine); a scenario
marked slow in tests/golden/scenarios.py runs with ``pytest -m ""`` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.golden.scenarios import GOLDEN_FILE, SCENARIOS, Session, environment, same

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:CLIP encoder .* RANDOM weights"),
]

GOLDEN = json.loads(GOLDEN_FILE.read_text())
SHOWN = 20  # differences listed in a failure message


def _scenarios(part: str) -> list[Any]:
    """The recorded scenarios that hold ``part``, each marked slow when its scenario is."""
    return [
        pytest.param(name, marks=pytest.mark.slow if SCENARIOS[name].slow else ())
        for name, record in GOLDEN["scenarios"].items()
        if record.get(part)
    ]


@pytest.fixture(scope="session")
def golden_session(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Session]:
    """The session's scenario runner: each scenario runs once, when a test first asks for it. Their times are
    printed at the end of the session."""
    session = Session(tmp_path_factory.mktemp("golden"))
    yield session
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None and session.seconds:
        times = ", ".join(f"{n} {s:.0f} s ({session.cpu_seconds[n]:.0f} s CPU)" for n, s in session.seconds.items())
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            print(f"\ngolden scenarios: {sum(session.seconds.values()):.0f} s in all: {times}")


def _differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every recorded value must be there and equal; values that did not exist when it was recorded (new metrics,
    metric conventions, logged columns) are additions, not differences."""
    lines = [f"  {key}: missing now (recorded {recorded[key]!r})" for key in recorded if key not in now]
    lines += [
        f"  {key}: recorded {recorded[key]!r}, now {now[key]!r}"
        for key in recorded
        if key in now and not same(recorded[key], now[key])
    ]
    return lines


def _compare(name: str, parts: list[str], session: Session) -> None:
    recorded, now = GOLDEN["scenarios"][name], session.record(name)
    report = []
    for part in parts:
        lines = _differences(recorded.get(part, {}), now.get(part, {}))
        if lines:
            report.append(f"{part} ({len(lines)} of {len(recorded.get(part, {}))} differ):")
            report += lines[:SHOWN] + ([f"  ... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else [])
    if report:
        env, here = GOLDEN["environment"], environment()
        where = [f"  {k}: recorded on {env.get(k)!r}, running on {here[k]!r}" for k in here if env.get(k) != here[k]]
        note = ["environment differs (the numbers are bit-exact for one machine type):", *where] if where else []
        pytest.fail("\n".join([f"scenario {name!r} differs from {GOLDEN_FILE.name}:", *report, *note]), False)


@pytest.mark.parametrize("name", _scenarios("numbers"))
def test_results_are_the_recorded_ones(name: str, golden_session: Session) -> None:
    _compare(name, ["numbers", "checkpoints", "settings"], golden_session)


@pytest.mark.parametrize("name", _scenarios("overlays"))
def test_overlay_pixels_are_the_recorded_ones(name: str, golden_session: Session) -> None:
    _compare(name, ["overlays"], golden_session)


def test_every_scenario_is_recorded() -> None:
    assert list(GOLDEN["scenarios"]) == list(SCENARIOS), "re-record: python -m tests.golden.record"
    assert GOLDEN_FILE.stat().st_size < 200_000


def test_the_digests_see_values_not_layout(tmp_path: Path) -> None:
    """The digests see what they should: tensor bytes, names and shapes; decoded pixels, not PNG bytes."""
    import numpy as np
    import torch
    from PIL import Image

    from tests.golden.scenarios import pixels_digest, state_dict_digest

    a = {"w": torch.zeros(2, 3), "b": torch.ones(3)}
    assert state_dict_digest(a) == state_dict_digest(dict(reversed(a.items())))
    assert state_dict_digest(a) != state_dict_digest({"w": torch.zeros(3, 2), "b": torch.ones(3)})
    assert state_dict_digest(a) != state_dict_digest({"v": torch.zeros(2, 3), "b": torch.ones(3)})
    assert state_dict_digest(a) != state_dict_digest({"w": torch.zeros(2, 3, dtype=torch.float64), "b": a["b"]})
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(pixels).save(tmp_path / "fast.png", compress_level=1)
    Image.fromarray(pixels).save(tmp_path / "small.png", compress_level=9)
    assert pixels_digest(tmp_path / "fast.png") == pixels_digest(tmp_path / "small.png")
    assert same(0.1 + 0.2, 0.30000000000000004) and not same(0.1 + 0.2, 0.3) and not same(0.0, -0.0)
    assert same(float("nan"), float("nan"))
