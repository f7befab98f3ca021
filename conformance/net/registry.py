"""The topology registry: every `topos` dict of the files in topologies/ (the `mn --custom` files)."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from conformance.errors import InputError
from conformance.net.topo import MptcpTopo

TOPOLOGY_DIR = Path(os.environ.get("MPTCP_CONFORMANCE_TOPOLOGIES",
                                   Path(__file__).resolve().parents[2] / "topologies"))


@functools.cache
def topologies(folder: Path = TOPOLOGY_DIR) -> dict[str, Callable[..., MptcpTopo]]:
    found: dict[str, Callable[..., MptcpTopo]] = {}
    for path in sorted(Path(folder).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_mptcp_topologies_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise InputError(f"{path}: cannot load topology file ({type(exc).__name__}: {exc})") from None
        topos = getattr(module, "topos", None)
        if not isinstance(topos, dict):
            raise InputError(f"{path}: no `topos` dict (name -> Topo class) at module level")
        for name, factory in topos.items():
            if name in found:
                raise InputError(f"{path}: topology {name!r} is also defined in another file")
            found[name] = factory
    return found


def make_topology(name: str, **params) -> MptcpTopo:
    known = topologies()
    if name not in known:
        raise InputError(f"unknown topology {name!r}; known: {', '.join(sorted(known))}")
    return known[name](**params)
