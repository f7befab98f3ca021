"""RFC 8684 §3.2, §3.4, §3.5, active: a scripted MPTCP client joins with an unknown token,
advertises addresses (good, forged and out-of-window), withdraws an unknown address ID, and fast
closes with the right and the wrong key; the kernel listener's answers are judged on the wire and
in its counters."""

import random

import pytest

from conformance.endpoints.linux import MptcpConfig

# The scripted peer speaks IPv4 in the dual-stack variant too: on the wire it is the ipv4 case.
pytestmark = [pytest.mark.topology("two_path"), pytest.mark.families("ipv4", "ipv6")]

KB = 1000
HANDSHAKE = [{"op": "syn", "options": [{"MPCapable": {"flags": 0x01}}]},
             {"op": "ack", "options": [{"MPCapable": {"flags": 0x01, "sender_key": "$client_key",
                                                      "receiver_key": "$server_key"}}]},
             {"op": "data", "size": KB, "mapping": "mpc"}, {"op": "recv", "until": "any", "timeout": 2}]
CLOSE = [{"op": "data_fin"}, {"op": "recv", "until": "fin", "timeout": 3}]
ANNOUNCED = "198.18.77.1"  # an address of nobody: the listener may try to join it, never reach it


ANNOUNCED6 = "2001:db8:1:77::1"  # the same, for an IPv6 connection (a host joins within a family)


def _add_addr(hmac, address: str = ANNOUNCED, **extra) -> dict:
    return {"AddAddr": {"address_id": 7, "address": address, "truncated_hmac": hmac, **extra}}


def _echoes(run) -> list[dict]:
    return [s for s in run.received for n, f in s["options"] if n == "AddAddr" and f.get("echo")]


@pytest.mark.rfc8684("R3.2-07", "R3.2-L05")
def test_join_with_an_unknown_token_is_reset(lab):
    """An MP_JOIN SYN naming a token no connection has: a RST (with MP_TCPRST 'MPTCP-specific
    error', reason 1, where the host sends one)."""
    token = random.getrandbits(32)
    run = lab.script([{"op": "syn", "options": [{"MPJoinSyn": {"address_id": 1, "receiver_token": token,
                                                               "sender_random": random.getrandbits(32)}}]}])
    rst, synack = run.first("R"), run.first("SA")
    e = lab.expect
    e.that(rst is not None and synack is None, "an MP_JOIN SYN with an unknown token draws a RST",
           expected="RST, no SYN/ACK", seen=run.describe(rst or synack), rid="R3.2-07")
    reason = run.option(rst, "MPTCPRst")
    e.that(reason is not None and reason["reason"] == 1, "the RST carries MP_TCPRST 'MPTCP-specific error'",
           expected="MP_TCPRST reason 1", seen=run.describe(rst), rid="R3.2-L05")
    e.counter(run.counters, "s1", "MPJoinNoTokenFound", 1, rid="R3.2-07")


@pytest.mark.rfc8684("R3.4.1-L01", "R3.4.1-L02")
def test_add_addr_is_echoed_without_hmac(lab):
    """A port-less ADD_ADDR whose HMAC covers ID, address and a zero port: accepted and echoed with
    E=1, the same ID and address, and no HMAC."""
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [_add_addr("$hmac")]},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    echoes = _echoes(run)
    e = lab.expect
    echo = run.option(echoes[0], "AddAddr") if echoes else None
    e.that(echo is not None and echo["address_id"] == 7 and echo["address"] == ANNOUNCED
           and echo.get("truncated_hmac") is None, "the ADD_ADDR is echoed: E=1, same ID and address, no HMAC",
           expected=f"AddAddr(echo=1, address_id=7, address={ANNOUNCED}) without HMAC",
           seen=run.describe(echoes[0]) if echoes else "no echo", rid="R3.4.1-L01")
    e.counter(run.counters, "s1", "AddAddr", 1, rid="R3.4.1-L02")


@pytest.mark.rfc8684("R3.4.1-09")
def test_add_addr_with_a_wrong_hmac_is_ignored(lab):
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [_add_addr(0x0123456789ABCDEF)]},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    echoes = _echoes(run)
    e = lab.expect
    e.that(not echoes, "an ADD_ADDR whose HMAC does not verify is not echoed", expected="no echo",
           seen=run.describe(echoes[0]) if echoes else "no echo", rid="R3.4.1-09")
    e.counter(run.counters, "s1", "AddAddr", 0, rid="R3.4.1-09")
    run.expect_no_reset(e, "and the connection is not reset", rid="R3.4.1-09")


@pytest.mark.rfc8684("R3.4.1-11")
def test_add_addr_reserved_bits_are_ignored(lab):
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [_add_addr("$hmac", reserved=0x7)]},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    echoes = _echoes(run)
    lab.expect.that(bool(echoes), "an ADD_ADDR with unassigned flag bits set is handled normally (echoed)",
                    expected="an echo", seen=run.describe(echoes[0]) if echoes else "no echo", rid="R3.4.1-11")


@pytest.mark.rfc8684("R3.4.1-01")
def test_out_of_window_add_addr_is_not_acted_on(lab):
    """An otherwise valid ADD_ADDR on a segment far outside the receive window (RFC 5961)."""
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [_add_addr("$hmac")], "seq_offset": 2**30},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    echoes = _echoes(run)
    e = lab.expect
    e.that(not echoes, "an ADD_ADDR outside the TCP window is not echoed", expected="no echo",
           seen=run.describe(echoes[0]) if echoes else "no echo", rid="R3.4.1-01")
    e.counter(run.counters, "s1", "AddAddr", 0, rid="R3.4.1-01")


@pytest.mark.rfc8684("R3.4.2-L02")
def test_remove_addr_of_an_unknown_id_is_ignored(lab):
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [{"RemoveAddr": {"address_ids": [42]}}]},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    e = lab.expect
    run.expect_no_reset(e, "a REMOVE_ADDR naming an unknown ID draws no RST", rid="R3.4.2-L02")
    run.expect_intact(e, "and the connection completes normally", rid="R3.4.2-L02")


@pytest.mark.rfc8684("R3.5-L01")
def test_fast_close_with_the_listener_key_resets(lab):
    """An ACK with MP_FASTCLOSE carrying the listener's key: the listener resets the subflow."""
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [{"MPFastclose": {"receiver_key": "$server_key"}}]},
                      {"op": "recv", "until": "rst", "timeout": 2}], expect=KB)
    rst = run.first("R")
    e = lab.expect
    e.that(rst is not None, "MP_FASTCLOSE with the right key draws a RST", expected="RST",
           seen=run.describe(rst) if rst else "no RST", rid="R3.5-L01")
    e.counter(run.counters, "s1", "MPFastcloseRx", 1, rid="R3.5-L01")


@pytest.mark.rfc8684("R3.5-L01")
def test_fast_close_with_a_wrong_key_is_ignored(lab):
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [{"MPFastclose": {"receiver_key": 0x1234}}]},
                      {"op": "recv", "until": "quiet", "timeout": 1}, *CLOSE], expect=KB)
    e = lab.expect
    run.expect_no_reset(e, "MP_FASTCLOSE with a wrong key draws no RST", rid="R3.5-L01")
    run.expect_intact(e, "and the connection completes normally", rid="R3.5-L01")


# -- joins: the scripted client opens a second subflow from its second interface -----------------

# A connection that is closing takes no joins (Linux: the MPTCP socket must be ESTABLISHED), and
# the listener closes its side once it has sent: it holds its KB back for 2 s (JOINABLE), the join
# comes first, and the script's last KB and the listener's data are exchanged after it (LAST).
JOINABLE = {"expect": 2 * KB, "send": KB, "server_send_delay": 2.0}
LAST = [{"op": "data", "size": KB, "mapping": "auto"}, {"op": "recv", "until": f"data:{KB}", "timeout": 4},
        *CLOSE]


def _joined(hmac: str = "good") -> list[dict]:
    return [*HANDSHAKE, {"op": "join", "subflow": 1, "address_id": 1, "hmac": hmac}]


@pytest.mark.rfc8684("R3.2-03", "R3.2-04")
def test_join_handshake_with_our_hmacs(lab):
    """A correct MP_JOIN SYN: the SYN/ACK carries MP_JOIN with a truncated HMAC that verifies with
    Key-B||Key-A over R-B||R-A, and our third ACK (full HMAC) is answered with a plain ACK."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined("good"), {"op": "recv", "until": "quiet", "timeout": 1}, *LAST], **JOINABLE)
    join = run.peer["joins"][0] if run.peer["joins"] else {}
    sub1 = [s for s in run.received if s["subflow"] == 1]
    synack = next((s for s in sub1 if "S" in s["flags"] and "A" in s["flags"]), None)
    e = lab.expect
    e.that(run.option(synack, "MPJoinSynAck") is not None and join.get("synack_hmac_ok") is True,
           "the join SYN/ACK carries MP_JOIN whose truncated HMAC verifies", expected="MP_JOIN, HMAC verifies",
           seen=f"{run.describe(synack)}; HMAC ok: {join.get('synack_hmac_ok')}", rid="R3.2-03")
    after = [s for s in sub1 if s is not synack]
    first = after[0] if after else None
    e.that((first is not None and first["flags"] == "A" and not first["options"]) or (
        first is not None and first["flags"] == "A" and all(n == "DSS" for n, _ in first["options"])),
        "the third ACK is answered by a plain ACK", expected="ACK without MP_JOIN",
        seen=run.describe(first), rid="R3.2-04")
    e.counter(run.counters, "s1", "MPJoinAckRx", 1, rid="R3.2-04")
    e.counter(run.counters, "s1", "MPJoinAckHMacFailure", 0, rid="R3.2-04")


@pytest.mark.rfc8684("R3.2-10")
@pytest.mark.parametrize("hmac", ["bad", "none"])
def test_join_third_ack_without_a_valid_hmac_is_reset(lab, hmac):
    """The join's third ACK with a corrupted HMAC, or without MP_JOIN: the subflow is reset."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined(hmac), {"op": "recv", "subflow": 1, "until": "rst", "timeout": 2}, *LAST],
                     **JOINABLE)
    rst = next((s for s in run.received if s["subflow"] == 1 and "R" in s["flags"]), None)
    e = lab.expect
    e.that(rst is not None, f"a join third ACK with {'a corrupted HMAC' if hmac == 'bad' else 'no MP_JOIN'} "
           "draws a RST on that subflow", expected="RST", seen=run.describe(rst) if rst else "no RST",
           rid="R3.2-10")
    if hmac == "bad":
        e.counter(run.counters, "s1", "MPJoinAckHMacFailure", 1, rid="R3.2-10")
    run.expect_intact(e, "the connection itself goes on on the first subflow")


@pytest.mark.rfc8684("R3.2-07", "R3.2-L04")
def test_join_beyond_the_subflow_limit_is_reset(lab):
    """The listener allows no additional subflow: a correct join SYN must be answered with a RST
    (with MP_TCPRST 'administratively prohibited', reason 3, where the host says why)."""
    lab.configure("s1", MptcpConfig(subflows=0))
    run = lab.script([*_joined("good"), {"op": "recv", "subflow": 1, "until": "rst", "timeout": 2}, *LAST],
                     **JOINABLE)
    sub1 = [s for s in run.received if s["subflow"] == 1]
    rst = next((s for s in sub1 if "R" in s["flags"]), None)
    e = lab.expect
    e.that(bool(sub1) and "R" in sub1[0]["flags"], "a join SYN beyond the limit is answered with a RST",
           expected="RST to the SYN, no SYN/ACK", seen=run.describe(sub1[0]) if sub1 else "nothing",
           rid="R3.2-07", deviation=lab.known_deviation("R3.2-07"))
    e.that(rst is not None, "the refused subflow is reset", expected="RST",
           seen=run.describe(rst) if rst else "none")
    reason = run.option(rst, "MPTCPRst")
    e.that(reason is not None and reason["reason"] == 3, "the RST says 'administratively prohibited'",
           expected="MP_TCPRST reason 3", seen=run.describe(rst), rid="R3.2-L04")
    e.counter(run.counters, "s1", "MPJoinRejected", 1)


@pytest.mark.rfc8684("R3.5-L02")
def test_fast_close_on_a_rst_resets_every_subflow(lab):
    """A RST with MP_FASTCLOSE (the listener's key) on the first subflow: the listener resets the
    other subflow too."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined("good"), {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 0.5},
                      {"op": "rst", "options": [{"MPFastclose": {"receiver_key": "$server_key"}}]},
                      {"op": "recv", "subflow": 1, "until": "rst", "timeout": 2}], **JOINABLE)
    rst = next((s for s in run.received if s["subflow"] == 1 and "R" in s["flags"]), None)
    e = lab.expect
    e.that(rst is not None, "the listener resets the second subflow after a fast close on the first",
           expected="RST on subflow 1", seen=run.describe(rst) if rst else "no RST", rid="R3.5-L02")
    e.counter(run.counters, "s1", "MPFastcloseRx", 1, rid="R3.5-L02")


@pytest.mark.rfc8684("R3.4.1-08", "R3.4.1-15")
def test_listener_joins_an_announced_address_at_the_right_port(lab):
    """The scripted client announces an address without a port: the listener's join SYN goes to
    the port of the subflow the ADD_ADDR came on. Announced again with the same ID and address but a
    port: the listener tries that port too. (The address belongs to nobody: the SYNs are judged
    where they leave the listener.)"""
    from conformance.observe.segments import decode

    lab.configure("s1", MptcpConfig(subflows=4, add_addr_accepted=4))
    announced = ANNOUNCED6 if lab.family == "ipv6" else ANNOUNCED
    run = lab.script([*HANDSHAKE, {"op": "ack", "options": [_add_addr("$hmac", announced)]},
                      {"op": "recv", "until": "quiet", "timeout": 1.5},
                      {"op": "ack", "options": [_add_addr("$hmac", announced, port=6000)]},
                      {"op": "recv", "until": "quiet", "timeout": 1.5}, *LAST], **JOINABLE)
    sport = run.peer["subflows"][0]["sport"]
    syns = [s for s in decode(run.pcaps["s1-eth0"]) if s.dst == announced and s.mptcp("MP_JOIN")]
    ports = sorted({s.dport for s in syns})
    e = lab.expect
    e.that(sport in ports, "the join to the port-less announced address goes to the carrying subflow's port",
           expected=f"an MP_JOIN SYN to {announced}:{sport}", seen=f"MP_JOIN SYNs to ports {ports}",
           rid="R3.4.1-08")
    e.that(6000 in ports, "the address announced again with port 6000 is tried at that port",
           expected=f"an MP_JOIN SYN to {announced}:6000", seen=f"MP_JOIN SYNs to ports {ports}", rid="R3.4.1-15")
    e.counter(run.counters, "s1", "PortAdd", 1, rid="R3.4.1-15")


@pytest.mark.rfc8684("R3.6-08")
def test_mp_tcprst_undefined_flags_are_ignored(lab):
    """A RST with MP_TCPRST whose undefined flags U, V, W are set closes the join subflow like any
    RST with MP_TCPRST: the listener counts it and the connection goes on over the first subflow."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined("good"), {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 0.5},
                      {"op": "rst", "subflow": 1, "options": [{"MPTCPRst": {"flags": 0x0E, "reason": 1}}]},
                      {"op": "recv", "until": "quiet", "timeout": 0.5}, *LAST], **JOINABLE)
    e = lab.expect
    e.counter(run.counters, "s1", "MPRstRx", 1, rid="R3.6-08")
    run.expect_no_reset(e, "no RST from the listener follows", rid="R3.6-08")
    run.expect_intact(e, "the connection completes over the first subflow", rid="R3.6-08")


@pytest.mark.rfc8684("R3.4.2-08")
def test_out_of_window_remove_addr_is_ignored(lab):
    """REMOVE_ADDR for the join's address on a segment far outside the TCP window (RFC 5961):
    the listener keeps the subflow."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined("good"), {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 0.3},
                      {"op": "ack", "options": [{"RemoveAddr": {"address_ids": [1]}}], "seq_offset": 2**30},
                      {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 1}, *LAST], **JOINABLE)
    closed = next((s for s in run.received if s["subflow"] == 1 and ("R" in s["flags"] or "F" in s["flags"])),
                  None)
    e = lab.expect
    e.that(closed is None, "the join subflow is not closed after an out-of-window REMOVE_ADDR",
           expected="no RST or FIN on subflow 1", seen=run.describe(closed) if closed else "none", rid="R3.4.2-08")
    e.counter(run.counters, "s1", "RmAddr", 0, rid="R3.4.2-08")


@pytest.mark.rfc8684("R3.4.2-04")
def test_remove_addr_of_a_live_subflow_is_probed_first(lab):
    """REMOVE_ADDR naming the address of a subflow that still works: the listener should first probe
    the path with a TCP keepalive (a segment at SND.NXT - 1) before it tears the subflow down."""
    lab.configure("s1", MptcpConfig(subflows=2))
    run = lab.script([*_joined("good"), {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 0.3},
                      {"op": "ack", "options": [{"RemoveAddr": {"address_ids": [1]}}]},
                      {"op": "recv", "subflow": 1, "until": "quiet", "timeout": 1.5}, *LAST], **JOINABLE)
    removal = next(s for s in run.peer["segments"] if s["dir"] == "out" and any(
        n == "RemoveAddr" for n, _ in s["options"]))
    sub1 = [s for s in run.received if s["subflow"] == 1 and "S" not in s["flags"]]
    before = [s for s in sub1 if s["t"] < removal["t"]]
    after = [s for s in sub1 if s["t"] >= removal["t"]]
    nxt = (before[-1]["seq"] + before[-1]["len"]) % 2**32 if before else None
    probe = next((s for s in after if nxt is not None and s["seq"] == (nxt - 1) % 2**32), None)
    closed = next((s for s in after if "R" in s["flags"] or "F" in s["flags"]), None)
    lab.expect.that(probe is not None and (closed is None or probe["t"] <= closed["t"]),
                    "a keepalive probe on the named subflow comes before any teardown",
                    expected="a segment at SND.NXT - 1 before any RST/FIN",
                    seen=(f"probe {run.describe(probe)}; " if probe else "no probe; ")
                    + (f"teardown {run.describe(closed)}" if closed else "no teardown"),
                    rid="R3.4.2-04", deviation=lab.known_deviation("R3.4.2-04"))
