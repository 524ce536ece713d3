"""How long a preset takes has one source: its description in the preset file (what
``attn-bench list`` and the run's metadata show), measured on 2 cores. The committed report of a
preset agrees with it, and every page that gives a preset's time quotes it."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted((ROOT / "bench" / "attn_bench").glob("*/*presets.toml"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PHRASE = re.compile(r"(about|under|at most|in)\s+([\w.]+\s+){1,2}(minutes?|hours?|s)\s+on\s+2\s+cores")


def phrase_for(seconds: float) -> str:
    """The wording of a measured duration: the minute, rounded."""
    minutes = round(seconds / 60)
    return "about a minute" if minutes <= 1 else f"about {minutes} minutes"


def presets() -> dict[str, str]:
    """Every preset of every job: name -> description."""
    out = {}
    for path in PRESET_FILES:
        for name, spec in tomllib.loads(path.read_text()).get("presets", {}).items():
            if isinstance(spec, dict) and "description" in spec:
                out[name] = spec["description"]
    return out


def cpu_time(description: str) -> str | None:
    """The duration a description gives for 2 cores, less the words "on 2 cores", or None."""
    found = PHRASE.search(description)
    return None if found is None else found.group(0).rsplit(" on ", 1)[0]


def test_every_cpu_preset_says_its_time_one_way() -> None:
    timed = {name: cpu_time(d) for name, d in presets().items() if cpu_time(d)}
    assert {"cpu-quick", "decode-quick", "task-quick", "long-quick", "swap-quick", "model-quick"} <= set(timed)
    for name, text in timed.items():
        assert re.fullmatch(r"about (a minute|\d+ minutes|an hour)", text), (name, text)


def _measured(preset: str) -> float | None:
    meta_path = ROOT / "reports" / preset / "metadata.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("status") != "complete" or not meta.get("started") or not meta.get("finished"):
        return None
    return (datetime.fromisoformat(meta["finished"]) - datetime.fromisoformat(meta["started"])).total_seconds()


@pytest.mark.parametrize("preset", sorted(n for n, d in presets().items() if cpu_time(d)))
def test_committed_report_agrees_with_the_preset(preset: str) -> None:
    seconds = _measured(preset)
    if seconds is None:
        pytest.skip(f"no committed report of {preset}")
    assert cpu_time(presets()[preset]) == phrase_for(seconds), f"reports/{preset} took {seconds:.0f} s"


def test_pages_quote_the_preset_files() -> None:
    """A time given on 2 cores next to a preset's name is that preset's own."""
    times = {name: cpu_time(d) for name, d in presets().items()}
    names = sorted(times, key=len, reverse=True)
    checked = 0
    for page in PAGES:
        text = " ".join(page.read_text().split())
        for found in PHRASE.finditer(text):
            before = text[max(0, found.start() - 160) : found.start()]
            near = [(before.rfind(n), n) for n in names if before.rfind(n) != -1]
            if not near:
                continue
            _, name = max(near)
            assert times[name] and found.group(0).startswith(times[name]), (page.name, name, found.group(0))
            checked += 1
    assert checked >= 8
