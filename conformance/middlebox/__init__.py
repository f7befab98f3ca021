"""Middlebox profiles attached to the routers of a topology (RFC 8684 §3.7 and §6).

    from conformance.middlebox import profile
    box = lab.middlebox("strip-mptcp-syn", router="r1")            # a built-in profile
    box = lab.middlebox(profile("strip-mptcp-all", from_packet=4), router="all", direction="s2c")
    ...
    box.expect_acted(lab.expect)                                     # its rules matched

profile.py holds the data (Profile, Match, the actions) and its validation, catalogue.py the
built-in profiles, placement.py which router interfaces face the client and the server, bpf.py
the payload-length programs, rules.py the iptables/nft state a profile becomes, engine.py the
installation into a router's namespace, the counters and the removal; rewriter.py (NFQUEUE) and
proxy.py are the helper processes of the profiles no netfilter target can be."""

from conformance.middlebox.catalogue import BUNDLES, PROFILES, profile
from conformance.middlebox.engine import Effect, Middlebox, attach
from conformance.middlebox.profile import (
    DIRECTIONS,
    SEGMENTS,
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

__all__ = [
    "BUNDLES",
    "DIRECTIONS",
    "PROFILES",
    "SEGMENTS",
    "AlgRewrite",
    "ClampMss",
    "Coalesce",
    "Drop",
    "Effect",
    "Match",
    "Middlebox",
    "Profile",
    "ProfileError",
    "Resegment",
    "RewritePayload",
    "RewriteSeq",
    "Snat",
    "StripOption",
    "TcpProxy",
    "attach",
    "profile",
]
