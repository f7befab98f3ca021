"""MPTCP inside scapy's TCP options: the one place that knows how scapy carries option kind 30.

Scapy's TCPOptionsField decodes only the kinds in its TCPOptions table and leaves kind 30 as
raw bytes. Importing conformance.wire registers kind 30 as "MPTCP" in that table (scapy's own
extension point) and gives the TCP layer's options field a subclass that (a) dissects kind 30
into our option classes, so a packet from a pcap or a sniffer shows decoded MPTCP options in
`show()`, and (b) emits our option objects byte for byte, so `TCP(options=[MPCapable(...)])`
works and a deliberately malformed option (a wrong length) goes out as built. Every other
option still goes through scapy's own code.

This swaps the class of one field instance rather than editing scapy's code: every packet class
holding that field keeps working, and nothing else in scapy changes."""

from __future__ import annotations

from scapy.layers.inet import TCP, TCPOptions, TCPOptionsField

from conformance.wire.options import KIND, MPTCPOption, parse_option

NAME = "MPTCP"


def _split(x: bytes) -> list[bytes]:
    """Cut raw TCP option bytes into one chunk per option, the way scapy walks them."""
    chunks = []
    while x:
        kind = x[0]
        if kind == 0:  # EOL: the rest is padding
            chunks.append(x)
            break
        if kind == 1:
            chunks.append(x[:1])
            x = x[1:]
            continue
        length = x[1] if len(x) > 1 else 0
        # A length below 2 would loop forever; scapy assumes 2. For MPTCP keep the whole rest so
        # the malformed option is reported with its bytes.
        size = length if length >= 2 else (len(x) if kind == KIND else 2)
        chunks.append(x[:size])
        x = x[size:]
    return chunks


class MptcpTCPOptionsField(TCPOptionsField):
    def m2i(self, pkt, x):
        out = []
        for chunk in _split(bytes(x)):
            if chunk[0] == KIND:
                out.append((NAME, parse_option(chunk)))
            else:
                out.extend(super().m2i(pkt, chunk))
        return out

    def i2m(self, pkt, x):
        if not x:
            return b""
        opt = b""
        for entry in x:
            if isinstance(entry, MPTCPOption):
                opt += bytes(entry)
                continue
            oname, oval = entry
            if isinstance(oval, MPTCPOption):
                opt += bytes(oval)
                continue
            if oname in (NAME, KIND) and isinstance(oval, bytes):
                opt += bytes([KIND, len(oval) + 2]) + oval
                continue
            one = super().i2m(pkt, [entry])
            # scapy pads every call; keep only the option itself (its length byte says how long).
            opt += one[:1] if one[:1] in (b"\x00", b"\x01") else one[:one[1]]
        return opt + b"\x00" * (3 - ((len(opt) + 3) % 4))

    def i2repr(self, pkt, x):
        return repr([e if not isinstance(e, tuple) or not isinstance(e[1], MPTCPOption)
                     else (e[0], e[1].summary()) for e in (x or [])])


def install() -> None:
    """Register kind 30 with scapy and decode it in the TCP layer (idempotent)."""
    TCPOptions[0][KIND] = (NAME, None)
    TCPOptions[1][NAME] = KIND
    field = next(f for f in TCP.fields_desc if f.name == "options")
    if not isinstance(field, MptcpTCPOptionsField):
        field.__class__ = MptcpTCPOptionsField


def mptcp_options(tcp) -> list[MPTCPOption]:
    """The MPTCP options of a scapy TCP layer, in order (like scapy's get_tcpao for TCP-AO)."""
    return [v for k, v in tcp.options if k == NAME and isinstance(v, MPTCPOption)]
