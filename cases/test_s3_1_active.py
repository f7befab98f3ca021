"""RFC 8684 §3.1, active: a scripted MPTCP client sends the kernel listener handshakes it must
refuse, fall back from, or cope with, and the listener's answers are judged on the wire."""

import pytest

from conformance.wire import crypto

# The scripted peer speaks IPv4 in the dual-stack variant too: on the wire it is the ipv4 case.
pytestmark = [pytest.mark.topology("two_path"), pytest.mark.families("ipv4", "ipv6")]

KB = 1000


def _syn(flags: int, version: int = 1) -> dict:
    return {"op": "syn", "options": [{"MPCapable": {"version": version, "flags": flags}}]}


THIRD_ACK = {"op": "ack", "options": [{"MPCapable": {"flags": 0x01, "sender_key": "$client_key",
                                                     "receiver_key": "$server_key"}}]}
AS_TCP = [{"op": "ack"}, {"op": "data", "size": KB}, {"op": "fin"}, {"op": "recv", "until": "fin", "timeout": 3}]


def _plain_tcp_after(lab, run, what: str, rid: str) -> None:
    """The listener answered without MP_CAPABLE and the connection carries on as plain TCP."""
    e = lab.expect
    synack = run.first("SA")
    e.that(synack is not None and "R" not in synack["flags"], f"the listener accepts the SYN ({what})",
           expected="a SYN/ACK", seen=run.describe(synack or run.first("R")), rid=rid)
    e.that(run.option(synack, "MPCapable") is None, f"its SYN/ACK carries no MP_CAPABLE ({what})",
           expected="no MP_CAPABLE: the option is ignored", seen=run.describe(synack), rid=rid)
    later = [s for s in run.received if s["options"] and s is not synack]
    e.that(not later, "no later segment of the listener carries an MPTCP option", expected="none",
           seen=run.describe(later[0]) if later else "none", rid=rid)
    run.expect_intact(e, "the data arrives over a plain TCP (fallen back) socket", rid=rid, fallback=True)


@pytest.mark.rfc8684("R3.1-02")
def test_listener_answers_an_unknown_version_with_one_it_knows(lab):
    """A SYN offering version 2: the SYN/ACK's MP_CAPABLE, if any, has a version <= 2."""
    run = lab.script([_syn(0x01, version=2), *AS_TCP], expect=KB)
    synack = run.first("SA")
    mpc = run.option(synack, "MPCapable")
    lab.expect.that(synack is not None and (mpc is None or mpc["version"] <= 2),
                    "the SYN/ACK answers version 2 with no MP_CAPABLE or a version <= 2",
                    expected="no MP_CAPABLE, or version <= 2", seen=run.describe(synack), rid="R3.1-02")
    run.notes.append("kernel's choice: " + ("plain TCP" if mpc is None else f"version {mpc['version']}"))


@pytest.mark.rfc8684("R3.1-16")
def test_listener_ignores_mp_capable_with_b_set(lab):
    """B=1 (extensibility) is not understood by this listener: it must ignore the option."""
    run = lab.script([_syn(0x41), *AS_TCP], expect=KB)
    _plain_tcp_after(lab, run, "B=1", "R3.1-16")


@pytest.mark.rfc8684("R3.1-20", "R3.1-L03")
def test_listener_ignores_mp_capable_without_crypto_flags(lab):
    """No crypto flag (D..H all 0): an invalid MP_CAPABLE, an ordinary TCP handshake."""
    run = lab.script([_syn(0x80), *AS_TCP], expect=KB)
    _plain_tcp_after(lab, run, "A set, D..H clear", "R3.1-20")
    lab.expect.that(run.option(run.first("SA"), "MPCapable") is None, "handled as an ordinary TCP handshake",
                    expected="no MP_CAPABLE", seen=run.describe(run.first("SA")), rid="R3.1-L03")


@pytest.mark.rfc8684("R3.1-28")
def test_listener_refuses_only_unknown_crypto(lab):
    """Only flag G (an unassigned algorithm), H clear: no MP_CAPABLE in the SYN/ACK."""
    run = lab.script([_syn(0x02), *AS_TCP], expect=KB)
    _plain_tcp_after(lab, run, "only G", "R3.1-28")


@pytest.mark.rfc8684("R3.1-31")
def test_third_ack_without_mp_capable_means_plain_tcp(lab):
    """The handshake completes with an ACK lacking MP_CAPABLE: the listener falls back."""
    run = lab.script([_syn(0x01), *AS_TCP], expect=KB)
    e = lab.expect
    synack = run.first("SA")
    e.that(run.option(synack, "MPCapable") is not None, "the listener offers MPTCP in its SYN/ACK",
           expected="MP_CAPABLE", seen=run.describe(synack))
    later = [s for s in run.received if s["options"] and s is not synack]
    e.that(not later, "after an MP_CAPABLE-less third ACK, the listener sends no MPTCP option",
           expected="none", seen=run.describe(later[0]) if later else "none", rid="R3.1-31")
    run.expect_intact(e, "the accepted socket fell back and got the data intact", rid="R3.1-31", fallback=True)


@pytest.mark.rfc8684("R3.1-L02")
def test_duplicate_mp_capable_data_mapping_delivers_once(lab):
    """The MP_CAPABLE with data is sent twice (a retransmission): the data arrives once, in
    order, and the connection is not reset."""
    run = lab.script([_syn(0x01), THIRD_ACK, {"op": "data", "size": KB, "mapping": "mpc"}, {"op": "resend"},
                      {"op": "data", "size": KB, "mapping": "auto"}, {"op": "data_fin"},
                      {"op": "recv", "until": "fin", "timeout": 3}], expect=2 * KB)
    e = lab.expect
    run.expect_no_reset(e, "the listener does not reset the connection", rid="R3.1-L02")
    run.expect_intact(e, "the data arrives once, in order, over MPTCP", rid="R3.1-L02", bytes_received=2 * KB,
                      mptcp=True)


@pytest.mark.rfc8684("R3.1-25")
def test_checksums_used_when_the_initiator_asks(lab):
    """The initiator sets A; the listener (checksums off by default) must then checksum every
    DSS mapping, and each checksum must verify over the data it maps."""
    run = lab.script([_syn(0x81), {"op": "ack", "options": [{"MPCapable": {
        "flags": 0x81, "sender_key": "$client_key", "receiver_key": "$server_key"}}]},
        {"op": "recv", "until": f"data:{20 * KB}", "timeout": 5}, {"op": "data_fin"},
        {"op": "recv", "until": "fin", "timeout": 3}], send=20 * KB)
    from conformance.endpoints.transfer import stream

    data = b"".join(stream("server", 20 * KB))
    idsn = crypto.idsn(run.peer["server_key"])
    mappings = [(s, f) for s in run.received for n, f in s["options"] if n == "DSS" and f.get("data_level_length")]
    bad = []
    for seg, f in mappings:
        start = (f["dsn"] - idsn - 1) % 2**64
        length = f["data_level_length"] - (1 if f["flags"] & 0x10 else 0)
        if f.get("checksum") is None or not crypto.dss_checksum_ok(
                f["dsn"], f["ssn"], f["data_level_length"], data[start:start + length], f["checksum"]):
            bad.append(seg)
    e = lab.expect
    e.that(bool(mappings), "the listener sends DSS mappings", expected="some", seen=len(mappings))
    e.that(not bad, "every DSS mapping of the listener carries a checksum that verifies", expected="all verify",
           seen=run.describe(bad[0]) if bad else f"{len(mappings)} mappings verify", rid="R3.1-25")
