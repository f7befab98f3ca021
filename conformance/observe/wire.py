"""Finding the protocol moments a case judges in a decoded capture."""

from __future__ import annotations

from dataclasses import dataclass

from conformance.errors import HarnessError
from conformance.observe.segments import Segment


@dataclass
class Handshake:
    syn: Segment
    synack: Segment
    ack: Segment
    stream: list[Segment]  # the whole subflow, in capture order

    def first_data(self, from_client: bool) -> Segment | None:
        src = self.syn.src if from_client else self.synack.src
        return next((s for s in self.stream if s.src == src and s.payload > 0), None)


def handshakes(segments: list[Segment]) -> list[Handshake]:
    """Every TCP three-way handshake in the capture, in the order the SYNs appear."""
    by_stream: dict[int, list[Segment]] = {}
    for s in segments:
        by_stream.setdefault(s.stream, []).append(s)
    out = []
    for stream in by_stream.values():
        syn = next((s for s in stream if s.has("S") and not s.has("A")), None)
        if syn is None:
            continue
        synack = next((s for s in stream if s.has("S") and s.has("A") and s.src == syn.dst), None)
        if synack is None:
            continue
        ack = next((s for s in stream if not s.has("S") and s.has("A") and s.src == syn.src
                    and s.frame > synack.frame), None)
        if ack is not None:
            out.append(Handshake(syn, synack, ack, stream))
    return sorted(out, key=lambda h: h.syn.frame)


def only_handshake(segments: list[Segment], where: str) -> Handshake:
    found = handshakes(segments)
    if len(found) != 1:
        raise HarnessError(f"{where}: expected exactly one TCP handshake, found {len(found)}")
    return found[0]


def describe(seg: Segment | None) -> str:
    return "nothing" if seg is None else str(seg)


def initial_subflow(segments: list[Segment], where: str) -> Handshake:
    """The handshake whose SYN offers MP_CAPABLE (the connection's first subflow)."""
    found = [h for h in handshakes(segments) if h.syn.mptcp("MP_CAPABLE")]
    if not found:
        raise HarnessError(f"{where}: no handshake with MP_CAPABLE in its SYN")
    return found[0]


def joins(segments: list[Segment]) -> list[Handshake]:
    """Every handshake whose SYN carries MP_JOIN."""
    return [h for h in handshakes(segments) if h.syn.mptcp("MP_JOIN")]
