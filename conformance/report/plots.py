"""The per-case sequence/time plot of report.html: each subflow direction's data as it left or
reached the client, one line per subflow, so a stall, a reinjection or a path failure shows at a
glance. Drawn with matplotlib (Agg: no display), embedded as a PNG data URI."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from conformance.errors import InputError

_POINTS = 1500  # per line; more only blurs the picture and swells the page
_MB = 1e6


def client_captures(folder: Path) -> list[Path]:
    """The client host's captures in a case's artefact folder and its per-run subfolders (a
    second transfer, a scripted peer's run); the topologies name the client c1."""
    return sorted(folder.rglob("c1-eth*.pcap"))


def sequence_plot(pcaps: list[Path], title: str) -> str | None:
    """A PNG data URI of data sequence (MB from each direction's first byte) over time (s), or
    None if the captures hold no data."""
    from conformance.observe.segments import decode  # scapy only when plotting

    lines: dict[tuple, tuple[list[float], list[float]]] = {}
    first: dict[tuple, int] = {}
    start = None
    for pcap in pcaps:
        try:
            segments = decode(pcap)
        except InputError:
            continue
        for s in segments:
            if not s.payload:
                continue
            key = (pcap.parent.name, pcap.stem, s.src, s.sport, s.dst, s.dport)
            base = first.setdefault(key, s.seq)
            start = s.time if start is None else min(start, s.time)
            xs, ys = lines.setdefault(key, ([], []))
            xs.append(s.time)
            ys.append(((s.seq - base) % 2**32) / _MB)
    if not lines or start is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state between cases

    fig = Figure(figsize=(7.5, 3.2), dpi=90)
    ax = fig.add_subplot()
    for (_, intf, src, sport, dst, dport), (xs, ys) in sorted(lines.items()):
        step = max(1, len(xs) // _POINTS)
        ax.plot([x - start for x in xs[::step]], ys[::step], ".", markersize=2,
                label=f"{intf}: {src}.{sport} > {dst}.{dport}")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("sequence (MB from first byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", markerscale=4)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
