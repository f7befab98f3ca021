"""RFC 8684 §3.7, active: the scripted client falls back with an infinite mapping, as a host
whose peer answered a checksum failure would, and the kernel listener must follow it for good:
no more Data ACKs, no return to MPTCP when MPTCP options come back, the data delivered in TCP
order."""

import pytest

from conformance.endpoints.linux import MptcpConfig

pytestmark = [pytest.mark.topology("two_path"), pytest.mark.families("ipv4", "ipv6")]

KB = 1000


def _handshake(flags: int) -> list[dict]:
    return [{"op": "syn", "options": [{"MPCapable": {"flags": flags}}]},
            {"op": "ack", "options": [{"MPCapable": {"flags": flags, "sender_key": "$client_key",
                                                     "receiver_key": "$server_key"}}]}]


def _after(run, marker: dict) -> list[dict]:
    """The listener's segments after the peer sent `marker` (one of its own segments)."""
    segments = run.peer["segments"]
    start = next(i for i, s in enumerate(segments) if s is marker)
    return [s for s in segments[start + 1:] if s["dir"] == "in"]


def _sent(run, test) -> list[dict]:
    return [s for s in run.peer["segments"] if s["dir"] == "out" and test(s)]


def _dss(segment: dict) -> dict | None:
    return next((f for n, f in segment["options"] if n == "DSS"), None)


def _mapping_length(segment: dict) -> int | None:
    dss = _dss(segment)
    return None if dss is None else dss.get("data_level_length")


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksums"])
@pytest.mark.rfc8684("R3.7-16", "R3.7-17")
def test_infinite_mapping_falls_back_for_good(lab, checksum):
    """After 2 kB mapped as usual, the client sends an infinite mapping and goes on as plain TCP;
    later it sends a DSS mapping again. The listener must stop sending Data ACKs once it has the
    infinite mapping (§3.7 SHOULD) and never return to MPTCP (MUST NOT): no MPTCP option from it
    after that, and all 6 kB delivered in TCP order."""
    steps = [*_handshake(0x81 if checksum else 0x01),
             *[{"op": "data", "size": KB, "mapping": "auto"}] * 2,
             {"op": "recv", "until": "quiet", "timeout": 0.3},
             {"op": "data", "size": KB, "mapping": "infinite"}, {"op": "recv", "until": "quiet", "timeout": 0.3},
             {"op": "data", "size": KB}, {"op": "recv", "until": "quiet", "timeout": 0.3},
             {"op": "data", "size": KB, "mapping": "auto"}, {"op": "recv", "until": "quiet", "timeout": 0.3},
             {"op": "data", "size": KB}, {"op": "fin"}, {"op": "recv", "until": "fin", "timeout": 3}]
    run = lab.script(steps, expect=6 * KB)
    e = lab.expect
    infinite = _sent(run, lambda s: _mapping_length(s) == 0)[0]
    remapped = _sent(run, lambda s: bool(_mapping_length(s)))[-1]
    before = [s for s in run.received if s not in _after(run, infinite) and s["len"] == 0 and _dss(s)]
    e.that(any(_dss(s)["flags"] & 0x01 for s in before), "before the infinite mapping the listener Data-ACKs",
           expected="a DSS with a Data ACK", seen=run.describe(before[-1]) if before else "none")
    acks = [s for s in _after(run, infinite) if _dss(s) and _dss(s)["flags"] & 0x01]
    e.that(not acks, "after the infinite mapping the listener sends no Data ACK", expected="none",
           seen=run.describe(acks[0]) if acks else f"none in {len(_after(run, infinite))} segments", rid="R3.7-16")
    back = [s for s in _after(run, remapped) if s["options"]]
    e.that(not back, "after a DSS mapping arrives again the listener still sends no MPTCP option",
           expected="none", rid="R3.7-17",
           seen=run.describe(back[0]) if back else f"none in {len(_after(run, remapped))} segments")
    e.counter(run.counters, "s1", "InfiniteMapRx", 1, rid="R3.7-17")
    run.expect_intact(e, "the 6 kB arrive in TCP order, the socket fallen back", rid="R3.7-17",
                      bytes_received=6 * KB, fallback=True)


@pytest.mark.rfc8684("R3.7-11", "R3.7-12")
def test_checksum_failure_with_a_hole_in_flight_resets_with_mp_fail(lab):
    """With checksums, the client joins a second subflow and resets it, so the data it carried is
    lost with it: the listener holds 1 kB, then a hole, then 1 kB whose checksum fails on its one
    remaining subflow. The in-flight data is not contiguous, so the listener must reset the
    subflow with RST + MP_FAIL naming the failed mapping's DSN, not fall back with an infinite
    mapping (§3.7), and the data after that DSN never reaches the application."""
    lab.configure("s1", MptcpConfig(subflows=2))
    steps = [*_handshake(0x81), {"op": "data", "size": KB, "mapping": "mpc"},
             {"op": "recv", "until": "any", "timeout": 2}, {"op": "join", "subflow": 1, "address_id": 1},
             {"op": "rst", "subflow": 1}, {"op": "sleep", "seconds": 0.2},
             {"op": "data", "size": KB, "mapping": "auto", "skip": KB, "checksum": "bad"},
             {"op": "recv", "until": "rst", "timeout": 2}]
    # The listener holds back its own data and DATA_FIN: a connection it has closed takes no join.
    run = lab.script(steps, expect=3 * KB, send=KB, server_send_delay=3.0, timeout=6)
    e = lab.expect
    corrupt = _sent(run, lambda s: _mapping_length(s) == KB)[-1]
    failed_dsn = _dss(corrupt)["dsn"]
    rst = next((s for s in _after(run, corrupt) if "R" in s["flags"] and s["subflow"] == 0), None)
    fail = run.option(rst, "MPFail")
    e.that(rst is not None and fail is not None, "the listener resets its only subflow with RST + MP_FAIL",
           expected="RST with MP_FAIL", rid="R3.7-11",
           seen=run.describe(rst) if rst else f"no RST; after the bad mapping: "
                f"{[run.describe(s) for s in _after(run, corrupt)][:3]}")
    e.that(fail is not None and fail.get("dsn") == failed_dsn, "the MP_FAIL names the failed mapping's DSN",
           expected=f"{failed_dsn:#x}", seen=run.describe(rst), rid="R3.7-11")
    infinite = [s for s in _after(run, corrupt) if _mapping_length(s) == 0]
    e.that(not infinite, "the listener sends no infinite mapping", expected="none",
           seen=run.describe(infinite[0]) if infinite else "none", rid="R3.7-11")
    got = run.server or {}
    e.that(got.get("bytes_received") == KB, "only the data before the hole reaches the application",
           expected=f"{KB} bytes", seen={k: got.get(k) for k in ("bytes_received", "receive_error")},
           rid="R3.7-12")
    e.counter(run.counters, "s1", "DataCsumErr", 1, rid="R3.7-11")


@pytest.mark.rfc8684("R3.7-03", "R3.7-04")
def test_join_whose_data_is_acked_without_a_data_ack_is_reset(lab):
    """The client joins a second subflow and resets the first, so the listener's data goes over
    the join; the client acknowledges it with plain ACKs, no DSS. Until a Data ACK has come back
    on a join, such an ACK means the path is not MPTCP-capable: the listener must reset the join
    (§3.7), with MP_TCPRST "Middlebox interference" (SHOULD)."""
    lab.configure("s1", MptcpConfig(subflows=2))
    steps = [*_handshake(0x01), {"op": "data", "size": KB, "mapping": "mpc"},
             {"op": "recv", "until": "any", "timeout": 2}, {"op": "join", "subflow": 1, "address_id": 1},
             {"op": "rst", "subflow": 0}, {"op": "recv", "subflow": 1, "until": "data:1000", "ack": False,
                                           "timeout": 4},
             {"op": "ack", "subflow": 1, "options": []},  # a plain ACK: no DSS, no Data ACK
             {"op": "recv", "subflow": 1, "until": "rst", "ack": False, "timeout": 3}]
    run = lab.script(steps, expect=KB, send=4 * KB, server_send_delay=1.0, timeout=8)
    e = lab.expect
    on_join = [s for s in run.received if s["subflow"] == 1]
    data = next((s for s in on_join if s["len"]), None)
    e.that(data is not None, "the listener sends data on the join once the first subflow is gone",
           expected="data on the join", seen=[run.describe(s) for s in on_join][:3] or "nothing")
    plain = _sent(run, lambda s: s["subflow"] == 1 and s["flags"] == "A" and not s["options"])
    later = [s for s in _after(run, plain[-1]) if s["subflow"] == 1] if plain else []
    rst = next((s for s in later if "R" in s["flags"]), None)
    e.that(rst is not None, "the listener resets the join whose data was ACKed without a Data ACK",
           expected="RST on the join", rid="R3.7-03", deviation=lab.known_deviation("R3.7-03"),
           seen=run.describe(rst) if rst else [run.describe(s) for s in later[:3]] or "nothing")
    reason = run.option(rst, "MPTCPRst")
    e.that(reason is not None and reason["reason"] == 6, "the RST carries MP_TCPRST 'Middlebox interference'",
           expected="MP_TCPRST reason 6", seen=run.describe(rst) if rst else "no RST",
           rid="R3.7-04", deviation=lab.known_deviation("R3.7-04"))
