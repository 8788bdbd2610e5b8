"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def require_chromium(why: str) -> Path:
    """Debian's Chromium for the browser tests. Missing, the test is skipped, unless UNIFIER_REQUIRE_BROWSER is set
    (CI sets it, after installing Chromium as the README says), where it fails."""
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"{CHROMIUM} is not installed (apt-get install chromium): {why}"
    if os.environ.get("UNIFIER_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)
