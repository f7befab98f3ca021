"""The dialect's values over our codec: what the script side sends, and how a kernel option is judged."""

from __future__ import annotations

from conformance.packetdrill.dialect import Endpoint, Flow, State, render
from conformance.packetdrill.script import Call, Option
from conformance.wire import DSS, AddAddr, MPJoinAck, MPJoinSynAck, crypto

SCRIPT_KEY, KERNEL_KEY = 2, 0x1122334455667788


def _state() -> tuple[State, Flow]:
    state = State(keys={"ckey": SCRIPT_KEY, "skey": KERNEL_KEY}, script_key=SCRIPT_KEY, kernel_key=KERNEL_KEY)
    flow = Flow(Endpoint("192.168.0.2", 8080), Endpoint("192.0.2.1", 40000), local_isn=1000, local_nonce=7)
    return state, flow


def _build(state: State, flow: Flow, name: str, **fields):
    return state.build(Option(name, fields), flow, ".", 1, 100, lambda port: Endpoint("192.0.2.2", port or 8080))


def test_dss_values_are_relative_to_the_senders_idsn_or_absolute_when_named() -> None:
    state, flow = _state()
    dss = _build(state, flow, "dss", dack_bits=64, dack=5, dsn_bits=32, dsn=3, ssn=1, dll=100)
    assert dss.data_ack == (crypto.idsn(KERNEL_KEY) + 5) % 2**64
    assert dss.dsn == (crypto.idsn(SCRIPT_KEY) + 3) % 2**32
    assert dss.checksum == crypto.dss_checksum((crypto.idsn(SCRIPT_KEY) + 3) % 2**64, 1, 100, bytes(100))
    named = _build(state, flow, "dss", dack_bits=64, dack=Call("trunc_r64_hmac", ("skey", 9)))
    assert named.data_ack == (crypto.idsn(KERNEL_KEY) + 9) % 2**64 and int(named.flags) == 0x03
    assert _build(state, flow, "dss", dsn_bits=64, dsn=1, ssn=1, dll=100, checksum=None).checksum is None


def test_a_kernel_data_ack_is_judged_in_the_script_s_terms() -> None:
    state, flow = _state()
    live = DSS(flags=0x03, data_ack=(crypto.idsn(SCRIPT_KEY) + 101) % 2**64)
    right, wrong = Option("dss", {"dack_bits": 64, "dack": 101}), Option("dss", {"dack_bits": 64, "dack": 100})
    assert state.judge(right, live, flow, ".", strict=True, payload=b"") == []
    diffs = state.judge(wrong, live, flow, ".", strict=True, payload=b"")
    assert diffs == ["dss dack (relative to the script's IDSN): expected 100, got 101"]
    assert render(live, state) == "dss dack8=101"


def test_add_addr_and_join_hmacs_come_from_the_keys_and_nonces() -> None:
    state, flow = _state()
    add = _build(state, flow, "add_address", address_id=1, addr=("s1", None), echo=False, hmac="auto")
    assert isinstance(add, AddAddr) and str(add.address) == "192.0.2.2" and state.addrs["s1"].ip == "192.0.2.2"
    assert add.truncated_hmac == crypto.add_addr_hmac(SCRIPT_KEY, KERNEL_KEY, 1, bytes([192, 0, 2, 2]), None)
    assert state.announced == {"192.0.2.2": (None, True)}
    synack = _build(state, flow, "mp_join_syn_ack", address_id=0, hmac="auto")
    assert isinstance(synack, MPJoinSynAck)
    assert synack.sender_truncated_hmac == crypto.join_synack_hmac(SCRIPT_KEY, KERNEL_KEY, 42, 7)
    wrong = _build(state, flow, "mp_join_ack", hmac=Call("full_160_hmac", ("ckey", "ckey")))
    assert isinstance(wrong, MPJoinAck)
    assert bytes(wrong.sender_hmac) == crypto.join_hmac(SCRIPT_KEY, SCRIPT_KEY, 42, 7)[:20]
    live = MPJoinAck(sender_hmac=crypto.join_hmac(KERNEL_KEY, SCRIPT_KEY, 7, 42)[:20])
    assert state.judge(Option("mp_join_ack", {"hmac": "auto"}), live, flow, ".", strict=True, payload=b"") == []


def test_rfc_mode_takes_either_data_ack_width_until_a_64_bit_dsn_was_sent() -> None:
    state, flow = _state()
    live = DSS(flags=0x01, data_ack=(crypto.idsn(SCRIPT_KEY) + 1) % 2**32)
    want = Option("dss", {"dack_bits": 64, "dack": 1})
    assert state.judge(want, live, flow, ".", strict=True, payload=b"") == [
        "dss Data ACK size: expected 64, got 32"]
    assert state.judge(want, live, flow, ".", strict=False, payload=b"") == [] and state.notes
    _build(state, flow, "dss", dack_bits=64, dack=1, dsn_bits=64, dsn=1, ssn=1, dll=100)
    assert state.judge(want, live, flow, ".", strict=False, payload=b"") == [
        "dss Data ACK size: expected 64, got 32"]
