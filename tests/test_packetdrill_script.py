"""The packetdrill dialect parser: what a script says, and a malformed one named at file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.packetdrill.script import Call, Or, ScriptError, Struct, Sym, load, option_size, parse
from conformance.packetdrill.variants import for_script

CORPUS = Path(__file__).resolve().parents[1] / "cases" / "packetdrill"

HEADER = "--tolerance_usecs=100000\n`../common/defaults.sh`\n"


def test_every_script_of_our_corpus_parses_and_names_requirements() -> None:
    scripts = sorted(CORPUS.rglob("*.pkt"))
    assert len(scripts) >= 25
    for path in scripts:
        script = load(path)
        assert script.events, path
        assert script.tolerance == 0.1, path
        assert script.requirements or "abort" in path.name, path


def test_times_packets_options_and_keys() -> None:
    s = parse(HEADER + """
0     socket(..., SOCK_STREAM, IPPROTO_MPTCP) = 3
+0.1  < addr[c0] > addr[s0] S 0:0(0) win 65535 <mss 1460, nop, wscale 7, mpcapable v1 flags[flag_a, flag_h] nokey>
+0    > S. 0:0(0) ack 1 <mss 1460, nop, wscale 9, mpcapable v1 flags 0x41 key[skey]>
0.5~0.7 < . 1:1(0) ack 1 win 256 <mpcapable v1 flags[flag_h] key[ckey=2, skey] mpcdatalen 2, nop, nop>
*     > P. 1:3(2) ack 1 <dss dack8=1 dsn4=3 ssn=1 dll=2 nocs fin, nop, nop>
+0...0.02 read(3, ..., 2) = 2
""", "t.pkt")
    assert s.options == {"tolerance_usecs": "100000"}
    command, sock, syn, synack, third, data, read = s.events
    assert command.time is None and command.action.text == "../common/defaults.sh"
    assert (sock.time.kind, sock.time.relative) == ("point", False)
    assert (syn.time.start, syn.time.relative, syn.action.src, syn.action.dst) == (0.1, True, "c0", "s0")
    assert syn.action.options[-1].fields == {"version": 1, "flags": 0x81, "keys": []}
    assert synack.action.options[-1].fields["flags"] == 0x41
    assert (third.time.kind, third.time.start, third.time.end) == ("window", 0.5, 0.7)
    assert third.action.options[0].fields["keys"] == [("ckey", 2), ("skey", None)]
    assert third.action.options[0].fields["datalen"] == 2
    assert data.time.kind == "any"
    assert data.action.options[0].fields == {"dack_bits": 64, "dack": 1, "dsn_bits": 32, "dsn": 3, "ssn": 1,
                                             "dll": 2, "checksum": None, "fin": True}
    assert (read.time.kind, read.time.start, read.time.end) == ("blocking", 0.0, 0.02)
    assert (read.action.name, read.action.args, read.action.result) == ("read", [3, Ellipsis, 2], 2)


def test_syscall_expressions() -> None:
    s = parse(HEADER + """
0  fcntl(3, F_SETFL, O_RDWR|O_NONBLOCK) = 0
+0 connect(3, ..., ...) = -1 EINPROGRESS (Operation now in progress)
+0 poll([{fd=3,
          events=POLLOUT, revents=POLLOUT}], 1, 1000) = 1
+0 recvmsg(3, {msg_name(...)=..., msg_iov(1)=[{..., 0}], msg_flags=0}, 0) = 0
+0 fcntl(3, F_GETFL) = 0x2 (flags O_RDWR)
""", "t.pkt")
    fcntl, connect, poll, recvmsg, getfl = (e.action for e in s.events[1:])
    assert fcntl.args[2] == Or((Sym("O_RDWR"), Sym("O_NONBLOCK")))
    assert (connect.result, connect.errno, connect.note) == (-1, "EINPROGRESS", "Operation now in progress")
    assert isinstance(poll.args[0][0], Struct) and poll.args[0][0].named["revents"] == Sym("POLLOUT")
    assert recvmsg.args[1].index["msg_iov"] == 1 and recvmsg.args[1].named["msg_flags"] == 0
    assert (getfl.result, getfl.note) == (2, "flags O_RDWR")


def test_mptcp_signal_options() -> None:
    s = parse(HEADER + """
0  < . 1:1(0) ack 1 win 256 <add_address address_id=1 addr[s1] port=9090 hmac=auto, nop, nop>
+0 < . 1:1(0) ack 1 win 256 <add_address addr[s1=inet_addr("192.0.2.9")] addr_echo>
+0 < S 0:0(0) win 1000 <mp_join_syn backup=1 address_id=2 token=sha256_32(skey) rand=7>
+0 < . 1:1(0) ack 1 win 1000 <mp_join_ack sender_hmac=full_160_hmac(ckey ckey)>
+0 < . 1:1(0) ack 1 win 256 <remove_address address_id=[1, 2], mp_prio backup=1, nop, nop, nop, nop>
+0 < R. 1:1(0) ack 1 win 256 <mp_fastclose ckey=42, mp_reset 3 flags[flag_t]>
+0 < . 1:1(0) ack 1 win 256 <mp_fail dsn8=101>
""", "t.pkt")
    opts = [e.action.options for e in s.events[1:]]
    assert opts[0][0].fields == {"echo": False, "address_id": 1, "addr": ("s1", None), "port": 9090,
                                 "hmac": "auto"}
    assert opts[1][0].fields["addr"] == ("s1", ("inet_addr", "192.0.2.9")) and opts[1][0].fields["echo"]
    assert opts[2][0].fields == {"backup": 1, "address_id": 2, "token": Call("sha256_32", ("skey",)), "rand": 7}
    assert opts[3][0].fields["hmac"] == Call("full_160_hmac", ("ckey", "ckey"))
    assert opts[4][0].fields == {"ids": [1, 2]} and opts[4][1].fields == {"backup": 1}
    assert opts[5][0].fields == {"key": ("ckey", 42)} and opts[5][1].fields == {"reason": 3, "transient": True}
    assert opts[6][0].fields == {"dsn": 101}


@pytest.mark.parametrize(("text", "where", "what"), [
    ("0 < S 0:0(0) win 1 <mss 1460, bogus 3>\n", ":3:", "unexpected"),
    ("0 < S 0:0(0) win 1 <mss 1460, nop>\n", ":3:1:", "not padded to a multiple of 4 bytes"),
    ("0 < S 0:5(0) win 1\n", ":3:1:", "does not match its length"),
    ("0 socket(..., SOCK_STREAM\n", ":3:", "end of script"),
    ("0 < . 1:1(0) ack 1 win 1 <mptcp_magic>\n", ":3:", "unexpected"),
    ("`second untimed command`\n0 socket(..., SOCK_STREAM, 0) = 3\n", ":3:1:", "unexpected"),
])
def test_a_malformed_script_is_named_at_file_line_and_column(text: str, where: str, what: str) -> None:
    with pytest.raises(ScriptError) as exc:
        parse(HEADER + text, "bad.pkt")
    message = str(exc.value)
    assert message.startswith("bad.pkt:") and where in message and what in message, message
    assert "\n" not in message


def test_a_script_names_the_engines_it_runs_under() -> None:
    s = parse("// engines: python (the fork cannot)\n" + HEADER + "0 socket(..., SOCK_STREAM, 0) = 3\n", "t.pkt")
    assert (s.engines, s.engines_why) == (("python",), "the fork cannot")
    with pytest.raises(ScriptError, match="unknown engine"):
        parse("// engines: ns, python\n" + HEADER, "t.pkt")


def test_option_sizes_follow_packetdrill() -> None:
    line = "0 < . 1:1(0) ack 1 win 1 <dss dack4=1 dsn8=1 ssn=1 dll=1, dss dack8=1 nocs, nop, nop, nop, nop>\n"
    s = parse(HEADER + line, "t.pkt")
    dss_with_checksum, dss_ack = s.events[1].action.options[:2]
    assert option_size(dss_with_checksum) == 4 + 4 + 8 + 4 + 2 + 2 and option_size(dss_ack) == 12


def test_variants_follow_the_file_name() -> None:
    assert for_script("x_v4.pkt") == ["ipv4", "ipv4-mapped-ipv6"]
    assert for_script("x_v6.pkt") == ["ipv6"]
    assert for_script("x.pkt") == ["ipv4", "ipv4-mapped-ipv6", "ipv6"]
    assert for_script("x.pkt", "ipv6") == ["ipv6"] and for_script("x_v6.pkt", "ipv4") == []
