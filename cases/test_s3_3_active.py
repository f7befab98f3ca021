"""RFC 8684 §3.3, active: the scripted client maps its data in ways the kernel listener must
accept (32-bit and 64-bit DSNs mixed, DSNs across a 2^32 boundary, DATA_FIN) or refuse (a checksum
where none was negotiated, none where one was), judged on the wire, in the listener's Data ACKs,
its counters and the data its application read."""

import functools
import hashlib

import pytest

from conformance.wire import crypto

# The scripted peer speaks IPv4 in the dual-stack variant too: on the wire it is the ipv4 case.
pytestmark = [pytest.mark.topology("two_path"), pytest.mark.families("ipv4", "ipv6")]

KB = 1000


def _handshake(flags: int = 0x01) -> list[dict]:
    return [{"op": "syn", "options": [{"MPCapable": {"flags": flags}}]},
            {"op": "ack", "options": [{"MPCapable": {"flags": flags, "sender_key": "$client_key",
                                                     "receiver_key": "$server_key"}}]}]


CLOSE = [{"op": "data_fin"}, {"op": "recv", "until": "fin", "timeout": 3}]


def _data_acks(run, bits: int = 64) -> list[int]:
    """The listener's Data ACKs of that width, in order."""
    wide = 0x02 if bits == 64 else 0
    return [f["data_ack"] for s in run.received for n, f in s["options"]
            if n == "DSS" and f["flags"] & 0x01 and f["flags"] & 0x02 == wide]


def _mapping_reset(lab, run, what: str, rid: str) -> None:
    e = lab.expect
    rst = run.first("R")
    answer = next((s for s in run.received if "S" not in s["flags"]), None)
    fallback = run.counters.get("s1", {}).get("MPTcpExtDssFallback", 0)
    e.that(rst is not None, f"a DSS mapping {what} draws a RST on the subflow", expected="RST",
           seen=(run.describe(rst) if rst else f"no RST; first answer {run.describe(answer)}; "
                 f"s1 MPTcpExtDssFallback {fallback}"), rid=rid, deviation=lab.known_deviation(rid))
    reason = run.option(rst, "MPTCPRst")
    e.that(reason is not None and reason["reason"] == 1, "the RST carries MP_TCPRST 'MPTCP-specific error'",
           expected="MP_TCPRST reason 1", seen=run.describe(rst), rid="R3.3-04",
           deviation=lab.known_deviation("R3.3-04"))


@pytest.mark.rfc8684("R3.3-02", "R3.3-04")
def test_checksum_where_none_was_negotiated_resets(lab):
    run = lab.script([*_handshake(0x01), {"op": "data", "size": KB, "mapping": "auto", "checksum": "always"},
                      {"op": "recv", "until": "rst", "timeout": 2}], expect=2 * KB)
    _mapping_reset(lab, run, "with a checksum, none negotiated", "R3.3-02")


@pytest.mark.rfc8684("R3.3-03", "R3.3-04")
def test_missing_checksum_where_one_was_negotiated_resets(lab):
    run = lab.script([*_handshake(0x81), {"op": "data", "size": KB, "mapping": "auto", "checksum": "never"},
                      {"op": "recv", "until": "rst", "timeout": 2}], expect=2 * KB)
    _mapping_reset(lab, run, "without the negotiated checksum", "R3.3-03")


@pytest.mark.rfc8684("R3.3.1-12")
def test_32_and_64_bit_dsns_mixed_are_delivered(lab):
    steps = [*_handshake()]
    for i in range(6):
        steps.append({"op": "data", "size": KB, "mapping": "auto", "dsn_bits": 32 if i % 2 else 64})
    run = lab.script([*steps, {"op": "recv", "until": "quiet", "timeout": 0.5}, *CLOSE], expect=6 * KB)
    run.expect_intact(lab.expect, "data mapped alternately with 4- and 8-byte DSNs arrives intact",
                      rid="R3.3.1-12", mptcp=True)


@functools.cache
def _key_with_idsn_below_a_wrap(margin: int = 3 * KB) -> int:
    """A key whose IDSN is within `margin` below a 2^32 boundary (found by search: SHA-256 decides)."""
    key = 1
    while True:
        low = int.from_bytes(hashlib.sha256(key.to_bytes(8, "big")).digest()[-4:], "big")
        if low > 2**32 - margin:
            return key
        key += 1


def _across_the_wrap(lab, bits: int, rid: str) -> None:
    """Our IDSN lies just below a 2^32 boundary and 10 KB cross it, mapped with `bits`-bit DSNs:
    the data arrives intact and the Data ACK reaches IDSN + 1 + 10000 (its low 32 bits when the
    listener answers 32-bit DSNs with 32-bit Data ACKs, which R3.3.2-02 allows)."""
    key = _key_with_idsn_below_a_wrap()
    steps = [*_handshake(), *({"op": "data", "size": KB, "mapping": "auto", "dsn_bits": bits} for _ in range(10)),
             {"op": "recv", "until": "quiet", "timeout": 0.5}, *CLOSE]
    run = lab.script(steps, expect=10 * KB, client_key=key)
    want = (crypto.idsn(key) + 1 + 10 * KB) % 2**64
    wide, narrow = _data_acks(run, 64), _data_acks(run, 32)
    reached = bool({want, (want + 1) % 2**64} & set(wide)) or (
        not wide and bool({want % 2**32, (want + 1) % 2**32} & set(narrow)))
    e = lab.expect
    e.that(reached, "the listener's Data ACK reaches IDSN + 1 + 10000 across the 2^32 boundary",
           expected=f"{want:#x} (+1 after the DATA_FIN)",
           seen=f"64-bit Data ACKs {[hex(a) for a in wide[-3:]]}, 32-bit {[hex(a) for a in narrow[-3:]]}", rid=rid)
    run.expect_intact(e, "the data across the boundary arrives intact", rid=rid)


@pytest.mark.rfc8684("R3.3.1-10")
def test_64_bit_dsns_across_a_2_32_boundary(lab):
    _across_the_wrap(lab, 64, "R3.3.1-10")


@pytest.mark.rfc8684("R3.3.1-14")
def test_32_bit_dsns_extended_across_a_wrap(lab):
    _across_the_wrap(lab, 32, "R3.3.1-14")


@pytest.mark.rfc8684("R3.3.3-L01")
def test_data_fin_takes_one_dsn_and_is_data_acked(lab):
    """10 bytes and then a DATA_FIN: the listener's Data ACK covers the data and the DATA_FIN's DSN."""
    run = lab.script([*_handshake(), {"op": "data", "size": 10, "mapping": "auto"},
                      {"op": "recv", "until": "any"}, *CLOSE], expect=10)
    want = (crypto.idsn(run.peer["client_key"]) + 1 + 10 + 1) % 2**64
    acks = _data_acks(run)
    lab.expect.that(want in acks, "the Data ACK after the DATA_FIN is IDSN + 1 + 10 + 1",
                    expected=f"{want:#x}", seen=f"64-bit Data ACKs {[hex(a) for a in acks[-3:]]}",
                    rid="R3.3.3-L01")
