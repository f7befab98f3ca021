"""RFC 8684 §3.2, §3.4, §3.5, active: a scripted MPTCP client joins with an unknown token,
advertises addresses (good, forged and out-of-window), withdraws an unknown address ID, and fast
closes with the right and the wrong key; the kernel listener's answers are judged on the wire and
in its counters."""

import random

import pytest

pytestmark = pytest.mark.topology("two_path")

KB = 1000
HANDSHAKE = [{"op": "syn", "options": [{"MPCapable": {"flags": 0x01}}]},
             {"op": "ack", "options": [{"MPCapable": {"flags": 0x01, "sender_key": "$client_key",
                                                      "receiver_key": "$server_key"}}]},
             {"op": "data", "size": KB, "mapping": "mpc"}, {"op": "recv", "until": "any", "timeout": 2}]
CLOSE = [{"op": "data_fin"}, {"op": "recv", "until": "fin", "timeout": 3}]
ANNOUNCED = "198.18.77.1"  # an address of nobody: the listener may try to join it, never reach it


def _add_addr(hmac, **extra) -> dict:
    return {"AddAddr": {"address_id": 7, "address": ANNOUNCED, "truncated_hmac": hmac, **extra}}


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
    e.that(run.first("R") is None, "and the connection is not reset", expected="no RST",
           seen=run.describe(run.first("R")) if run.first("R") else "none", rid="R3.4.1-09")


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
    e.that(run.first("R") is None, "a REMOVE_ADDR naming an unknown ID draws no RST", expected="no RST",
           seen=run.describe(run.first("R")) if run.first("R") else "none", rid="R3.4.2-L02")
    e.that(bool(run.server) and run.server.get("ok") is True, "and the connection completes normally",
           expected="data intact, normal close", seen={k: (run.server or {}).get(k) for k in ("ok", "mptcp")},
           rid="R3.4.2-L02")


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
    e.that(run.first("R") is None, "MP_FASTCLOSE with a wrong key draws no RST", expected="no RST",
           seen=run.describe(run.first("R")) if run.first("R") else "none", rid="R3.5-L01")
    e.that(bool(run.server) and run.server.get("ok") is True, "and the connection completes normally",
           expected="data intact", seen={k: (run.server or {}).get(k) for k in ("ok", "mptcp")}, rid="R3.5-L01")
