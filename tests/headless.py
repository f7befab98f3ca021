"""Headless Chromium (Debian's chromium package) for the tests that render our HTML pages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium binary (ci/setup.sh installs Debian's chromium package)")
    return found


def headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # In a network namespace of its own (only a loopback, gone with the process): the page needs
    # no network, and the browser must not reach any address we did not create.
    return subprocess.run(["unshare", "--net", binary, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-pings",
                           f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)
