"""The built-in middlebox profiles, by name: the option strippers, firewalls and rewriters of RFC
8684 §3.7 and §6. `profile(name, **changes)` returns one, optionally varied (`from_packet=5`)."""

from __future__ import annotations

from typing import Any

from conformance.middlebox.profile import (
    AlgRewrite,
    ClampMss,
    Coalesce,
    Drop,
    Match,
    Profile,
    ProfileError,
    Resegment,
    RewritePayload,
    RewriteSeq,
    Snat,
    StripOption,
    TcpProxy,
)

_STRIP = StripOption()

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("strip-mptcp-syn", Match("syn", mptcp=True), _STRIP, "c2s",
            description="removes MPTCP options from SYNs (a firewall normalising SYN options)"),
    Profile("strip-mptcp-synack", Match("synack", mptcp=True), _STRIP, "s2c",
            description="removes MPTCP options from SYN/ACKs"),
    Profile("strip-mptcp-third-ack", Match("third-ack", mptcp=True), _STRIP, "c2s",
            description="removes MPTCP options from the third ACK of the handshake only"),
    Profile("strip-mptcp-data", Match("data", mptcp=True), _STRIP, "both",
            description="removes MPTCP options from segments carrying data"),
    Profile("strip-mptcp-pure-ack", Match("pure-ack", mptcp=True), _STRIP, "both",
            description="removes MPTCP options from ACKs without data"),
    Profile("strip-mptcp-all", Match("any", mptcp=True), _STRIP, "both",
            description="removes MPTCP options from every segment (vary from_packet to start later)"),
    Profile("drop-mptcp-syn", Match("syn", mptcp=True), Drop(), "c2s",
            description="drops SYNs that carry an MPTCP option (a firewall blackholing them)"),
    Profile("corrupt-data", Match("data", nth=5), RewritePayload(), "c2s",
            description="flips one byte of the 5th data segment: TCP accepts it, a DSS checksum fails"),
    Profile("clamp-mss", Match("any"), ClampMss(1200), "both",
            description="clamps the MSS option of SYNs and SYN/ACKs to 1200"),
    Profile("snat", Match("any"), Snat(), "c2s",
            description="source NAT to the router's address, client ports rewritten to 20000-20999"),
    Profile("rewrite-seq", Match("any"), RewriteSeq(), "both",
            description="randomises each subflow's ISN as some firewalls do (client's sequence numbers "
                        "shifted, server's ACKs and SACK blocks shifted back)"),
    Profile("resegment", Match("data"), Resegment(500), "c2s",
            description="splits data segments into pieces of at most 500 bytes, each with the "
                        "original's options (segmentation offload, a resegmenting proxy)"),
    Profile("coalesce", Match("data"), Coalesce(1400), "c2s",
            description="merges a data segment with the next of its flow when both fit in 1400 bytes, "
                        "keeping the first one's options only (LRO, a buffering proxy)"),
    Profile("alg-shorten", Match("any"), AlgRewrite(4), "both",
            description="an ALG rewriting a string to a shorter one: 4 bytes cut from the client's 5th data "
                        "segment, later sequence numbers shifted both ways (TCP goes on, mappings no longer fit)"),
    Profile("tcp-proxy", Match("any"), TcpProxy(), "c2s",
            description="a TCP-terminating proxy: answers the client's connections itself as plain TCP "
                        "and opens its own plain TCP connections to the server"),
)}


# Middleboxes met together, as one network's behaviour: profile names attached in this order.
BUNDLES: dict[str, tuple[str, ...]] = {
    # An access network that normalises SYN options (MPTCP's go) and clamps the MSS (PPPoE, tunnels).
    "isp": ("strip-mptcp-syn", "clamp-mss"),
}


def profile(name: str, **changes: Any) -> Profile:
    """The built-in profile `name`, with `changes` applied (validated) if any."""
    if name not in PROFILES:
        bundles = f" (bundles, for Lab.middleboxes: {', '.join(BUNDLES)})" if BUNDLES else ""
        raise ProfileError(f"profile {name!r} not one of {', '.join(PROFILES)}{bundles}")
    return PROFILES[name].with_(**changes) if changes else PROFILES[name]
