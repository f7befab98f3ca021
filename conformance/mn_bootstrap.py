"""Let `mn --custom topologies/<file>.py` work with any Python that has Mininet.

Debian's /usr/bin/mn runs the system Python, which has Mininet but not our other dependencies;
when they are missing, the project's virtualenv (.venv, made by ci/setup.sh) supplies them.
Standard library only: this runs before any dependency is importable."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_dependencies() -> None:
    if importlib.util.find_spec("pyroute2") is not None:
        return
    tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = ROOT / ".venv" / "lib" / tag / "site-packages"
    if not site.is_dir():
        raise SystemExit(f"{ROOT}/topologies: pyroute2 is missing for {sys.executable} and there is no "
                         f"{site}; run `bash ci/setup.sh` first, or use .venv/bin/mn")
    sys.path.append(str(site))  # after the system paths: Mininet stays the system's own


ensure_dependencies()
