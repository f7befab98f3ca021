"""Link emulation with the qdiscs this kernel really has.

Rate limits use HTB. Delay, jitter and loss use netem where the kernel has it; where it does not,
conformance.net.emulation emulates them in netfilter (loss) and our NFQUEUE delay line (delay,
jitter), and only the rate limit and queue size are qdiscs here. Either way a tc
failure is a TopologyError at build time (Mininet's TCLink would only log it and leave the link
unshaped), and every applied qdisc is read back with `tc -j` and checked."""

from __future__ import annotations

import json
import math
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
        if not math.isfinite(value):
            raise TopologyError(f"{what}={value!r}: expected a finite time in ms")
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
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, int | float) or not bw > 0
                               or not math.isfinite(bw)):
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


def netem_args(shape: LinkShape) -> list[str]:
    """`tc qdisc ... netem` arguments giving a link's delay, jitter, loss and queue limit."""
    netem = ["netem"]
    if shape.delay_ms:
        netem += ["delay", f"{shape.delay_ms:g}ms"]
        if shape.jitter_ms:
            netem += [f"{shape.jitter_ms:g}ms"]
    if shape.loss:
        netem += ["loss", f"{shape.loss:g}%"]
    if shape.max_queue_size:
        netem += ["limit", str(shape.max_queue_size)]
    return netem


def htb_burst(mbps: float) -> int:
    """Bytes an HTB class may send at once: what the rate sends in 1 ms, at least 15 kB (Mininet's
    TCLink value). tc's default (one MTU at a high-resolution clock) makes every packet wait for the
    qdisc's timer, and on a loaded machine each late wake-up is lost link time: two 100 Mbit/s HTB
    hops in a row carried 81-88 Mbit/s of TCP here, against 93-95 with 15 kB."""
    return max(15_000, int(mbps * 1e6 / 8 / 1000))


def _tc(netns: str, *args: str) -> None:
    run(["tc", *args], netns=netns)


def apply_shape(netns: str, ifname: str, shape: LinkShape, *, netem_available: bool) -> None:
    """Install `shape` as the root qdisc tree of `ifname`, then verify it is there.

    Without netem only the rate (HTB) and the queue size (pfifo) are installed here: the caller
    emulates delay, jitter and loss some other way (conformance.net.emulation)."""
    if shape.empty:
        return
    if shape.needs_netem and not netem_available:
        shape = LinkShape(bw=shape.bw, max_queue_size=shape.max_queue_size)
        if shape.empty:
            return
    want = []
    try:
        parent = ["root"]
        if shape.bw is not None:
            _tc(netns, "qdisc", "add", "dev", ifname, "root", "handle", "1:", "htb", "default", "1")
            burst = str(htb_burst(shape.bw))
            _tc(netns, "class", "add", "dev", ifname, "parent", "1:", "classid", "1:1", "htb",
                "rate", f"{shape.bw}mbit", "ceil", f"{shape.bw}mbit", "burst", burst, "cburst", burst)
            parent = ["parent", "1:1"]
            want.append("htb")
        if shape.needs_netem:
            _tc(netns, "qdisc", "add", "dev", ifname, *parent, "handle", "10:", *netem_args(shape))
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
