"""Link emulation with the qdiscs this kernel really has.

Rate limits use HTB. Delay, jitter and loss need netem; where netem is missing that is a
TopologyError at build time (Mininet's TCLink would only log the tc failure and leave the link
unshaped). Every applied shape is read back with `tc -j` and checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from conformance.errors import CommandError, TopologyError
from conformance.proc import run

_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?\s*$")


def _ms(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TopologyError(f"{what}={value!r}: expected a time such as '10ms', '500us' or '0.1s'")
    if isinstance(value, int | float):
        if value < 0:
            raise TopologyError(f"{what}={value!r}: a time cannot be negative")
        return float(value)
    m = _TIME_RE.match(str(value))
    if not m:
        raise TopologyError(f"{what}={value!r}: expected a time such as '10ms', '500us' or '0.1s'")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


@dataclass(frozen=True)
class LinkShape:
    """What a link should do to traffic leaving each of its ends (Mininet TCLink parameter names)."""

    bw: float | None = None  # Mbit/s
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss: float | None = None  # percent
    max_queue_size: int | None = None  # packets

    @classmethod
    def from_params(cls, bw=None, delay=None, jitter=None, loss=None, max_queue_size=None) -> LinkShape:
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, int | float) or bw <= 0):
            raise TopologyError(f"bw={bw!r}: expected a positive number of Mbit/s")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)
                                 or not 0 <= loss <= 100):
            raise TopologyError(f"loss={loss!r}: expected a percentage between 0 and 100")
        if max_queue_size is not None and (isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int)
                                           or max_queue_size <= 0):
            raise TopologyError(f"max_queue_size={max_queue_size!r}: expected a positive packet count")
        shape = cls(bw, _ms(delay, "delay"), _ms(jitter, "jitter"), loss, max_queue_size)
        if shape.jitter_ms and not shape.delay_ms:
            raise TopologyError(f"jitter={jitter!r} needs a delay= to vary around")
        return shape

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss)

    @property
    def empty(self) -> bool:
        return self.bw is None and not self.needs_netem and self.max_queue_size is None


def _tc(netns: str, *args: str) -> None:
    run(["tc", *args], netns=netns)


def apply_shape(netns: str, ifname: str, shape: LinkShape, *, netem_available: bool) -> None:
    """Install `shape` as the root qdisc tree of `ifname`, then verify it is there."""
    if shape.empty:
        return
    if shape.needs_netem and not netem_available:
        asked = ", ".join(f"{k}={v:g}{unit}" for k, v, unit in (
            ("delay", shape.delay_ms, "ms"), ("jitter", shape.jitter_ms, "ms"), ("loss", shape.loss, "%")) if v)
        raise TopologyError(f"{netns}/{ifname}: {asked} needs the netem qdisc, which this kernel lacks "
                            "(see `mptcp-conformance doctor`, qdisc netem); only bw= works here")
    want = []
    try:
        parent = ["root"]
        if shape.bw is not None:
            _tc(netns, "qdisc", "add", "dev", ifname, "root", "handle", "1:", "htb", "default", "1")
            _tc(netns, "class", "add", "dev", ifname, "parent", "1:", "classid", "1:1", "htb",
                "rate", f"{shape.bw}mbit", "ceil", f"{shape.bw}mbit")
            parent = ["parent", "1:1"]
            want.append("htb")
        if shape.needs_netem:
            netem = ["netem"]
            if shape.delay_ms:
                netem += ["delay", f"{shape.delay_ms}ms"]
                if shape.jitter_ms:
                    netem += [f"{shape.jitter_ms}ms"]
            if shape.loss:
                netem += ["loss", f"{shape.loss}%"]
            if shape.max_queue_size:
                netem += ["limit", str(shape.max_queue_size)]
            _tc(netns, "qdisc", "add", "dev", ifname, *parent, "handle", "10:", *netem)
            want.append("netem")
        elif shape.max_queue_size:
            _tc(netns, "qdisc", "add", "dev", ifname, *parent, "handle", "10:", "pfifo", "limit",
                str(shape.max_queue_size))
            want.append("pfifo")
    except CommandError as exc:
        raise TopologyError(f"{netns}/{ifname}: cannot shape link as {shape}: {exc}") from None
    shown = json.loads(run(["tc", "-j", "qdisc", "show", "dev", ifname], netns=netns).stdout or "[]")
    kinds = {q.get("kind") for q in shown}
    missing = [k for k in want if k not in kinds]
    if missing:
        raise TopologyError(f"{netns}/{ifname}: qdisc(s) {missing} not installed (tc shows {sorted(kinds)})")
