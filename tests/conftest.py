"""Shared test setup: the engine is importable as ``aistats_engine``; acceptance cases are read
from ../shared/acceptance (never copied into the project)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # addon/ and tests/ are on sys.path (pyproject)

ACCEPTANCE = ROOT.parent / "shared" / "acceptance"


def load_cases(name: str) -> list[dict]:
    return json.loads((ACCEPTANCE / name).read_text())
