"""Our MP_JOIN cryptography against the kernel as a peer: a join handshake built by our code.

While a kernel-to-kernel connection runs, a scapy injector on the client host's second interface
sends an MP_JOIN SYN carrying the server's token (SHA-256 of the key seen on the wire), checks the
kernel's truncated HMAC in the SYN/ACK with our crypto, and answers with our full HMAC. The
kernel must accept it (MPJoinAckRx, no HMAC failure, a plain ACK back); a wrong HMAC must be
refused (MPJoinAckHMacFailure, RST)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conformance import doctor
from conformance.endpoints.counters import delta, read_counters
from conformance.endpoints.linux import MptcpConfig
from conformance.errors import CapabilityMissing
from conformance.lab import MB, Lab
from conformance.net.cleanup import Cleanup
from conformance.net.registry import make_topology
from conformance.observe.segments import decode
from conformance.observe.wire import initial_subflow
from conformance.proc import run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")

# Runs inside the client's namespace: one MP_JOIN handshake, printed as JSON.
INJECTOR = r"""
import json, random, sys
from scapy.all import IP, TCP, conf, sr1, send
import conformance.wire
from conformance.wire import MPJoinSyn, MPJoinAck, mptcp_options
from conformance.wire import crypto
src, dst, gw, dev = sys.argv[1:5]
dport, ckey, skey, corrupt = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8] == "1"
conf.verb = 0
# scapy routes by destination only (no policy rules): send this subflow out of its own interface.
conf.route.add(host=dst, gw=gw, dev=dev)
sport, isn, r_a = random.randrange(20000, 60000), random.randrange(2**32), random.randrange(2**32)
syn = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S", seq=isn, options=[("MSS", 1460),
      MPJoinSyn(address_id=9, receiver_token=crypto.token(skey), sender_random=r_a)])
synack = sr1(syn, iface=dev, timeout=3)
out = {"synack": synack is not None}
if synack is not None and TCP in synack:
    opts = mptcp_options(synack[TCP])
    out["synack_flags"] = str(synack[TCP].flags)
    out["synack_options"] = [type(o).__name__ for o in opts]
    if opts and type(opts[0]).__name__ == "MPJoinSynAck":
        r_b = opts[0].sender_random
        out["synack_hmac_ok"] = crypto.verify_join_synack(opts[0].sender_truncated_hmac, skey, ckey, r_b, r_a)
        mac = crypto.join_hmac(ckey, skey, r_a, r_b)[:20]
        if corrupt:
            mac = bytes([mac[0] ^ 0xFF]) + mac[1:]
        ack = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A", seq=isn + 1,
                                         ack=synack[TCP].seq + 1, options=[MPJoinAck(sender_hmac=mac)])
        reply = sr1(ack, iface=dev, timeout=3)
        if reply is not None and TCP in reply:
            out["reply_flags"] = str(reply[TCP].flags)
            out["reply_options"] = [type(o).__name__ for o in mptcp_options(reply[TCP])]
print(json.dumps(out))
"""


def _inject(lab: Lab, port: int, client_key: int, server_key: int, corrupt: bool) -> dict:
    ns = lab.net.netns("c1")
    src, dst = lab.addresses("c1")[1], lab.addresses("s1")[0]
    gw = lab.topo.addresses("r2", 6 if ":" in src else 4)[0]  # r2's address on the client's second path
    out = run([sys.executable, "-c", INJECTOR, src, dst, gw, "c1-eth1", str(port), str(client_key),
               str(server_key), "1" if corrupt else "0"], netns=ns, timeout=30)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("corrupt", [False, True], ids=["our-hmac", "corrupted-hmac"])
def test_kernel_accepts_a_join_with_our_hmacs(tmp_path, corrupt):
    try:
        doctor.require("root", "socket:mptcp", "tcpdump", "mnexec", "ethtool")
    except CapabilityMissing as exc:
        pytest.skip(str(exc))
    cleanup = Cleanup()
    results: dict = {}
    try:
        lab = Lab(make_topology("two_path", bw=8), tmp_path / "lab", cleanup)
        lab.configure("s1", MptcpConfig(subflows=4))
        ns = lab.net.netns("c1")
        # No socket of the client's kernel owns the injected subflow: keep it from resetting it.
        run(["iptables", "-A", "OUTPUT", "-o", "c1-eth1", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"],
            netns=ns)

        def during(port: int) -> None:
            # Keys from the initial subflow as captured so far (tcpdump writes each packet at once).
            seen = decode(tmp_path / "lab" / "s1-eth0.pcap")
            hs = initial_subflow([s for s in seen if port in (s.sport, s.dport)], "s1-eth0")
            server_key = hs.synack.mptcp("MP_CAPABLE")[0].get("sender_key")
            client_key = hs.ack.mptcp("MP_CAPABLE")[0].get("sender_key")
            before = read_counters(lab.net["s1"].pid)
            results["inject"] = _inject(lab, port, client_key, server_key, corrupt)
            results["server"] = delta(before, read_counters(lab.net["s1"].pid))

        lab.transfer(up=6 * MB, down=6 * MB, during=during)  # still up when the injector has started
    finally:
        cleanup.run()
    inject, server = results["inject"], results["server"]
    assert inject["synack"] and inject.get("synack_options") == ["MPJoinSynAck"], inject
    assert inject["synack_hmac_ok"], "the kernel's SYN/ACK HMAC does not verify with our crypto"
    assert server.get("MPTcpExtMPJoinSynRx") == 1, server
    if corrupt:
        assert server.get("MPTcpExtMPJoinAckHMacFailure") == 1, server
        assert "R" in inject.get("reply_flags", ""), inject
    else:
        assert server.get("MPTcpExtMPJoinAckRx") == 1, server
        assert not server.get("MPTcpExtMPJoinAckHMacFailure"), server
        # RFC 8684 §3.2: the third ACK is answered by a plain ACK (no MP_JOIN).
        assert inject.get("reply_flags") == "A" and "MPJoinSynAck" not in inject.get("reply_options", []), inject


def test_injector_script_is_valid_python():
    compile(INJECTOR, "injector", "exec")
    assert subprocess.run([sys.executable, "-c", "import conformance.wire"], check=False).returncode == 0
