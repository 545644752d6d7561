"""Shared test setup: the engine is importable as ``aistats_engine``; acceptance cases are read
from ../shared/acceptance (never copied into the project)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addon"))
sys.path.insert(0, str(ROOT / "tests"))

ACCEPTANCE = ROOT.parent / "shared" / "acceptance"


def load_cases(name: str) -> list[dict]:
    return json.loads((ACCEPTANCE / name).read_text())
