"""A Lab is one case's world: a running topology, its artefact folder, and the actions a case
takes in it (configure endpoints, transfer data), each collecting its evidence as it goes.

Everything a Lab creates is registered on its Cleanup stack and undone when the Lab closes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conformance.endpoints.counters import delta, read_counters
from conformance.endpoints.guest import endpoint as guests
from conformance.endpoints.guest.seat import IP, Seat, take_place
from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint, show_endpoints
from conformance.errors import HarnessError
from conformance.implementations import DEFAULT, Implementation
from conformance.implementations import get as get_implementation
from conformance.inject.run import ScriptRun, run_script
from conformance.middlebox import BUNDLES, Middlebox, Profile, ProfileError, attach
from conformance.net.capture import DEFAULT_SNAPLEN, Capture
from conformance.net.cleanup import Cleanup
from conformance.net.network import Network
from conformance.net.topo import MptcpTopo
from conformance.observe.counter_oracle import compare_counters, node_captures
from conformance.observe.counter_oracle import disagreements as counter_disagreements
from conformance.observe.oracles import TOKEN, compare, tshark_frames
from conformance.observe.rules import NOT_EXERCISED, PASS, check
from conformance.observe.segments import Segment, decode
from conformance.observe.tshark_analysis import compare_judgments
from conformance.proc import Background, run
from conformance.requirements.deviations import known_deviations
from conformance.verdict import Expect

TRANSFER = [sys.executable, "-m", "conformance.endpoints.transfer"]
MB = 1_000_000
# A case whose condition can fail to arise under load (NotExercised) runs this many more times at most.
RERUNS = 2


# The passive rules about how a connection is closed (FIN every subflow, no RST after DATA_FIN).
HARNESS_CLOSE_RULES = ("R3.3.3-03", "R3.3.3-04")
# The kernel's counts of subflows it reset because their data and mappings did not fit together.
MAPPING_RESETS = ("MPTcpExtDSSCorruptionReset", "MPTcpExtDSSNoMatchTCP", "MPTcpExtDSSNotMatching")
# What a failed report shows.
_OUTCOME = ("bytes_received", "first_difference", "difference_sample", "error", "send_error", "receive_error")


@dataclass
class TransferRun:
    """What one transfer left behind: endpoint reports, counter deltas, captures."""

    folder: Path
    client: dict
    server: dict
    counters: dict[str, dict[str, int]]  # node -> non-zero MIB counter deltas
    pcaps: dict[str, Path]  # interface -> capture file
    port: int
    notes: list[str] = field(default_factory=list)

    def segments(self, intf: str) -> list[Segment]:
        """The TCP segments of this transfer's port seen on `intf`, decoded by our codec."""
        return [s for s in decode(self.pcaps[intf]) if self.port in (s.sport, s.dport)]

    def tshark_token(self, intf: str, frame: int) -> str | None:
        """The token tshark derives from the key in `frame` (the second oracle), as 8 hex digits."""
        values = tshark_frames(self.pcaps[intf]).get(frame, {}).get(TOKEN)
        return f"{int(values[0]):08x}" if values else None

    def streams(self, intf: str) -> dict[int, list[Segment]]:
        out: dict[int, list[Segment]] = {}
        for s in self.segments(intf):
            out.setdefault(s.stream, []).append(s)
        return out

    def counter(self, node: str, name: str) -> int:
        return self.counters.get(node, {}).get(name if name.startswith(("MPTcp", "Tcp")) else
                                               f"MPTcpExt{name}", 0)

    def payload_bytes(self, intf: str) -> int:
        return sum(s.payload for s in self.segments(intf))

    def expect_stays_mptcp(self, e: Expect, what: str = "the connection stays MPTCP") -> None:
        """The client's socket still runs MPTCP at the end (MPTCP_INFO, no fallback)."""
        # mptcp (TCP_IS_MPTCP) is None where the kernel lacks the option (Debian's 6.1): MPTCP_INFO
        # answering (fallback False) then says it alone.
        e.that(self.client.get("mptcp") in (True, None) and self.client.get("fallback") is False, what,
               expected="MPTCP", seen={k: self.client.get(k) for k in ("fallback", "mptcp")})

    def expect_intact(self, e: Expect, *, rid: str | None = None, deviation: str | None = None) -> None:
        """Both ends received exactly the peer's bytes (sizes and SHA-256 in the endpoint reports)."""
        for role, report in (("client", self.client), ("server", self.server)):
            want = report.get("bytes_expected")
            e.that(report.get("ok") is True, f"{role} received the peer's {want} bytes intact (SHA-256)",
                   expected="ok", seen={k: report[k] for k in _OUTCOME if report.get(k) is not None},
                   rid=rid, deviation=deviation)


@dataclass
class Recording:
    """What Lab.record() collected: interface -> capture, node -> non-zero counter deltas."""

    pcaps: dict[str, Path] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    counter_names: dict[str, set[str]] = field(default_factory=dict)  # node -> the counters its kernel has


class Lab:
    def __init__(self, topo: MptcpTopo, folder: Path, cleanup: Cleanup, *, family: str = "ipv4",
                 implementations: dict[str, str] | None = None):
        self.topo, self.folder, self.cleanup, self.family = topo, folder, cleanup, family
        folder.mkdir(parents=True, exist_ok=True)
        self.net = Network(topo, cleanup)
        self._ports = iter(range(5201, 6000))
        self.transfers: list[TransferRun] = []
        self.expect = Expect()
        self.passive_ids: set[str] = set()  # requirements the passive rules judged in this lab
        # Which implementation plays each role (the report's matrix axis, conformance.implementations).
        self.implementations = dict(implementations or {"client": DEFAULT, "server": DEFAULT})
        self.daemons: dict[str, Background] = {}  # per host, an implementation's helper process
        self._configured: set[str] = set()
        self.attached: list[str] = []  # the middleboxes the case attached, for its results
        # Hosts whose place a guest kernel takes (implementations of kind vm).
        self.seats: dict[str, Seat] = {}
        for node in (topo.client, topo.server):
            impl = self.implementation(node)
            if impl.guest is not None:
                self._seat_guest(node, impl.guest)
        for router, (version, shape) in topo.guest_routers.items():
            seat = self._seat_guest(router, version, type(self.net[router]).sysctls)
            try:
                guests.emulate_path(seat, shape)
            except guests.Unsupported as exc:
                raise HarnessError(f"guest router {router}: {exc}") from None

    def _seat_guest(self, node: str, version: str, sysctls: dict[str, str] | None = None) -> Seat:
        intfs = sorted((i for _, i in self.topo.interfaces(node)), key=lambda i: int(i.rsplit("eth", 1)[1]))
        seat = take_place(guests.acquire(version, node, len(intfs)), node, self.net.netns(node), intfs,
                          self.cleanup, sysctls)
        self.seats[node] = seat
        self.cleanup.defer(f"keep {node}'s guest console", seat.save, self.folder)
        return seat

    def finish(self) -> None:
        """After the case: a guest kernel that printed an Oops, BUG or WARN fails it, whatever the
        case was about (the console is in the artefact folder)."""
        for node, seat in self.seats.items():
            broke = seat.broke()
            self.expect.that(not broke, f"the guest kernel on {node} ({seat.guest.kernel.release}) printed no "
                             "Oops, BUG or WARNING", expected="a quiet console",
                             seen="; ".join(broke[:3]) or "nothing")

    # -- addressing ---------------------------------------------------------------------------
    def addresses(self, node: str) -> list[str]:
        """The node's addresses usable for this lab's family (v4 for dual: see server_address)."""
        version = 6 if self.family == "ipv6" else 4
        return self.topo.addresses(node, version)

    def connect_address(self, node: str, index: int = 0) -> str:
        """The address a client connects to. In the dual-stack variant the sockets are AF_INET6
        and reach the IPv4 address through its v4-mapped form, as a dual-stack server sees it."""
        addr = self.addresses(node)[index]
        if self.family == "dual":
            return f"::ffff:{addr}"
        return addr

    def listen_address(self) -> str:
        return "::" if self.family in ("ipv6", "dual") else "0.0.0.0"

    # -- actions ------------------------------------------------------------------------------
    def implementation(self, node: str) -> Implementation:
        """Who plays `node`: the client or server role's implementation; routers are the local kernel."""
        role = {self.topo.client: "client", self.topo.server: "server"}.get(node)
        return get_implementation(self.implementations[role] if role else DEFAULT)

    def configure(self, node: str, cfg: MptcpConfig) -> None:
        """Tell `node` how to run MPTCP, through the implementation that plays it (which raises
        ImplementationUnsupported for what it cannot do: the case is then "unsupported")."""
        self.implementation(node).apply(self, node, cfg)
        self._configured.add(node)

    def two_subflows(self, **extra) -> None:
        """Both hosts allow two subflows (`extra`: more MptcpConfig fields for both, checksum=True
        say); the client joins a second one from its second interface."""
        second = self.addresses("c1")[1]
        self.configure("s1", MptcpConfig(subflows=2, **extra))
        self.configure("c1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(second, EndpointFlags.SUBFLOW,
                                                                           dev="c1-eth1")], **extra))

    def established(self, node: str, port: int) -> int:
        """How many of `node`'s TCP sockets (MPTCP subflows included) to or from `port` are up."""
        if node in self.seats:
            return guests.established(self.seats[node], port)
        out = run(["ss", "-Htn", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                  netns=self.net.netns(node), check=False).stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def wait_established(self, node: str, port: int, count: int, within: float = 10.0) -> int:
        """Wait until `count` of them are up (from a transfer's during= callback, say), at most
        `within` seconds; the count reached."""
        deadline = time.monotonic() + within
        while (now := self.established(node, port)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    # Link events, also from a transfer's during= callback (see conformance.net.network.Network).
    def link_down(self, node: str, peer: str) -> None:
        self.net.link_down(node, peer)

    def link_up(self, node: str, peer: str) -> None:
        self.net.link_up(node, peer)

    def blackhole(self, path: str | int) -> None:
        self.net.blackhole(path)

    def unblackhole(self, path: str | int) -> None:
        self.net.unblackhole(path)

    def middlebox(self, profile: Profile | str, *, router: str = "r1", direction: str | None = None) -> Middlebox:
        """Attach a middlebox profile (conformance.middlebox; a Profile or a built-in name) to
        `router` ("all": every path's router), in `direction` ("c2s", "s2c", "both"; default the
        profile's). It is removed with the topology; its counters land in the artefact folder."""
        box = attach(profile, self.net, cleanup=self.cleanup, router=router, direction=direction,
                     folder=self.folder)
        self.attached.append(f"{box.profile.name} on {box.where}")
        return box

    def middleboxes(self, bundle: str, *, router: str = "r1") -> list[Middlebox]:
        """Attach every profile of a bundle (conformance.middlebox.BUNDLES, e.g. "isp") to `router`,
        in order: one network's several middleboxes."""
        if bundle not in BUNDLES:
            raise ProfileError(f"bundle {bundle!r} not one of {', '.join(BUNDLES)}")
        return [self.middlebox(name, router=router) for name in BUNDLES[bundle]]

    def transfer(self, *, client: str | None = None, server: str | None = None, up: int = MB,
                 down: int = MB, mptcp_client: bool = True, mptcp_server: bool = True,
                 wait_subflows: int = 1, connect_to: str | None = None, timeout: float = 120,
                 snaplen: int = DEFAULT_SNAPLEN, abort_after: int | None = None,
                 server_send_delay: float = 0.0, during: Callable[[int], object] | None = None) -> TransferRun:
        """Client sends `up` bytes, server sends `down` bytes, both at once; captures on every
        interface of the topology. Returns the evidence; data integrity is in the reports.

        abort_after: the client stops after receiving that many bytes and closes with SO_LINGER 0,
        so its kernel ends the connection with MP_FASTCLOSE/MP_TCPRST (the server's report then
        shows the reset).
        server_send_delay: the server holds its data and DATA_FIN back this long, so the client's
        first data segment goes out before anything from the server (and carries MP_CAPABLE with
        data, §3.1).
        during: called with the transfer's port once the connection is established, while data
        flows, for mid-connection actions (endpoint changes); the transfer is awaited after it
        returns."""
        client = client or self.topo.client
        server = server or self.topo.server
        port = self.next_port()
        folder = self.folder if not self.transfers else self.folder / f"transfer-{len(self.transfers) + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        endpoints = (client, server)
        for node in endpoints:
            if node not in self._configured and self.implementation(node).needs_setup:
                self.configure(node, MptcpConfig())
            (folder / f"{node}-endpoints.json").write_text(
                json.dumps(self._endpoints(node), indent=2, default=str))
        with self.record(folder, snaplen=snaplen) as (rec, local):
            srv = self.start_endpoint(server, "server", self.listen_address(), port, down, up, mptcp_server,
                                      wait_subflows, folder, local, timeout, send_delay=server_send_delay)
            dst = connect_to or self.connect_address(server)
            cli = self.start_endpoint(client, "client", dst, port, up, down, mptcp_client, wait_subflows,
                                      folder, local, timeout, abort_after)
            self._snapshot_ss(endpoints, port, folder, cli)
            if during is not None:
                during(port)
            for proc in (cli, srv):
                proc.wait(timeout + 10)
            # Let the last FIN/ACKs cross the links before the captures close.
            time.sleep(0.2)
        reports = {}
        for role, node in (("client", client), ("server", server)):
            path = folder / f"{role}.json"
            if not path.exists():
                raise HarnessError(f"{role} on {node} wrote no report; stderr: "
                                   f"{(folder / f'{role}.err').read_text()[-500:]}")
            reports[role] = json.loads(path.read_text())
        result = TransferRun(folder, reports["client"], reports["server"], rec.counters, rec.pcaps, port)
        endpoint_intfs = {i for n, i in self.topo.interfaces() if n in (client, server)}
        self._cross_check(result, endpoint_intfs)
        self._passive(result, endpoint_intfs, rec.counter_names)
        self.transfers.append(result)
        return result

    def known_deviation(self, rid: str) -> str | None:
        """Why the implementations under test are known to deviate from `rid` (deviations.yaml),
        or None: a case passes it as `deviation=` to the check that judges `rid`."""
        known = known_deviations()
        keys = {k for name in self.implementations.values() for k in get_implementation(name).deviation_keys}
        why = "; ".join(f"{impl}: {known[impl][rid]}" for impl in sorted(keys) if rid in known.get(impl, {}))
        return why or None

    def script(self, steps: list[dict], **kwargs) -> ScriptRun:
        """Play `steps` from a scripted MPTCP peer against a kernel listener (conformance.inject.run)."""
        return run_script(self, steps, **kwargs)

    def _passive(self, run: TransferRun, endpoint_intfs: set[str], counter_names: dict[str, set[str]]) -> None:
        """The passive rules on every capture of the transfer: a rule that fails fails the case,
        whatever the case was about; every judged requirement goes into the results."""
        # Endpoint captures first: each subflow is read from the first capture that shows its SYN.
        order = sorted(run.pcaps, key=lambda i: (i not in endpoint_intfs, i))
        # Every link of the topology is captured, so every subflow is in these captures.
        pcaps = [run.pcaps[i] for i in order]
        conns, judgments = check(pcaps, complete=True)
        stalled = [f"{role}: {r.get('receive_error') or r.get('send_error')}"
                   for role, r in (("client", run.client), ("server", run.server))
                   if str(r.get("receive_error") or "").startswith(("TimeoutError", "Stopped"))
                   or str(r.get("send_error") or "").startswith("still sending")]
        endpoints = {n for n, i in self.topo.interfaces() if i in endpoint_intfs}
        broken = [f"{n} {c.removeprefix('MPTcpExt')} {run.counters[n][c]}" for n in sorted(endpoints)
                  for c in MAPPING_RESETS if run.counters.get(n, {}).get(c)]
        if stalled or broken:
            # An endpoint gave up at its deadline and closed a stalled socket with data unread, or
            # a kernel reset subflows whose data it could not map (its counters say so): the RSTs
            # that follow answer that, they are not the stack's way of ending a connection, so the
            # closing rules say nothing here (the stall or the broken mapping is the case's to judge).
            self.expect.that(True, "the transfer " + ("stalled and was closed at its deadline" if stalled else
                                                      "lost subflows to broken mappings")
                             + "; not judged: " + ", ".join(HARNESS_CLOSE_RULES), expected="-",
                             seen="; ".join(stalled + broken))
            judgments = [j for j in judgments if j.rid not in HARNESS_CLOSE_RULES]
        for j in judgments:
            if j.outcome == NOT_EXERCISED:
                continue
            self.passive_ids.add(j.rid)
            self.expect.that(j.outcome == PASS, f"passive: {j.sentence}", expected="what RFC 8684 requires",
                             seen=", ".join(str(w) for w in j.where[:3]) or "-", rid=j.rid,
                             deviation=self.known_deviation(j.rid))
        self._oracles(run, pcaps, conns, judgments, counter_names, endpoints)

    def _oracles(self, run: TransferRun, pcaps: list[Path], conns: list, judgments: list,
                 counter_names: dict[str, set[str]], endpoints: set[str]) -> None:
        """The passive verdicts against two independent views: tshark's MPTCP analysis of the same
        captures and the kernel's own MIB counters on each endpoint. A disagreement fails the case
        as an oracle disagreement; nobody's verdict is taken on trust."""
        theirs = compare_judgments(pcaps, judgments)
        self.expect.that(not theirs, "oracle: tshark's MPTCP analysis agrees with the passive rules",
                         expected="no disagreement", seen="; ".join(str(d) for d in theirs[:5])
                         or f"{len(judgments)} judgments, none contradicted", oracle=True)
        # The endpoints' counters only: a router runs no MPTCP socket, even where it owns an address
        # the captures show as a connection's end (a NAT's).
        captures = {n: c for n, c in node_captures(run.pcaps, self.topo.interfaces()).items() if n in endpoints}
        addresses = {n: self.topo.addresses(n) for n in captures}
        agreements = compare_counters(conns, run.counters, addresses, captures,
                                      available=counter_names)
        wrong = counter_disagreements(agreements)
        self.expect.that(not wrong, "oracle: the kernel's MPTcpExt counters agree with the captures",
                         expected="every compared counter within what the captures imply",
                         seen="; ".join(str(a) for a in wrong[:5]) or f"{len(agreements)} counters agree",
                         oracle=True)

    def _cross_check(self, run: TransferRun, intfs: set[str]) -> None:
        """Our codec against tshark on the endpoints' captures: a disagreement fails the case as an
        oracle disagreement, with the frames and fields, instead of trusting either decoder."""
        for intf in sorted(intfs):
            agreement = compare(run.pcaps[intf])
            shown = "; ".join(str(d) for d in agreement.disagreements[:5])
            self.expect.that(not agreement.disagreements,
                             f"oracle: our codec and tshark agree on every MPTCP option in {intf}.pcap",
                             expected="no disagreement",
                             seen=shown or f"{agreement.options} options and {agreement.fields} fields agree",
                             oracle=True)

    def _counters(self, node: str) -> dict[str, int]:
        if node in self.seats:
            return guests.read_counters(self.seats[node])
        return read_counters(self.net[node].pid)

    def _endpoints(self, node: str) -> list[dict]:
        if node in self.seats:
            return guests.show_endpoints(self.seats[node])
        return show_endpoints(self.net[node])

    def next_port(self) -> int:
        """A listening port no earlier run of this lab used (its captures stay apart)."""
        return next(self._ports)

    @contextlib.contextmanager
    def record(self, folder: Path, *, snaplen: int = DEFAULT_SNAPLEN) -> Iterator[tuple[Recording, Cleanup]]:
        """tcpdump on every interface and every node's MIB counters around the block. Processes the
        block starts go on the Cleanup it is given, which is undone (and the captures closed) when
        the block ends; then the counter deltas are read and written to counters.json."""
        before = {n.name: self._counters(n.name) for n in self.net.nodes()}
        rec = Recording()
        local = Cleanup()
        try:
            cap = Capture([(n, self.net.netns(n), i) for n, i in self.topo.interfaces()], folder, local,
                          snaplen=snaplen)
            rec.pcaps = {p.intf: p.path for p in cap.pcaps}
            yield rec, local
        finally:
            local.run()
        after = {n.name: self._counters(n.name) for n in self.net.nodes()}
        rec.counters = {n: delta(before[n], after[n]) for n in before}
        # What the kernel counts: the counter oracle compares only counters this kernel has.
        rec.counter_names = {node: set(values) for node, values in after.items()}
        self.expect.counter_names.update(rec.counter_names)
        (folder / "counters.json").write_text(json.dumps(rec.counters, indent=2, sort_keys=True))

    def start_endpoint(self, node, role, addr, port, send, expect, mptcp, wait_subflows, folder, cleanup,
               timeout, abort_after: int | None = None, send_delay: float = 0.0) -> Background:
        argv = [*TRANSFER, role, "--addr", addr, "--port", str(port), "--send", str(send), "--expect",
                str(expect), "--report", str(folder / f"{role}.json"), "--wait-subflows", str(wait_subflows),
                "--save-mismatch", str(folder / f"{role}-received.bin"),
                "--timeout", str(timeout)]
        if not mptcp:
            argv.append("--tcp")
        if abort_after is not None:
            argv += ["--abort-after", str(abort_after)]
        if send_delay:
            argv += ["--send-delay", str(send_delay)]
        proc: Background | guests.GuestProcess
        if node in self.seats:
            proc = guests.start_transfer(self.seats[node], f"{role}-{port}", argv[len(TRANSFER):], folder, role)
        else:
            proc = Background(argv, netns=self.net.netns(node), stdout=folder / f"{role}.out",
                              stderr=folder / f"{role}.err")
        cleanup.defer(f"stop {role} on {node}", proc.stop)
        if role == "server":
            proc.wait_for_output("listening", f"server on {node}")
        return proc

    def _snapshot_ss(self, nodes, port, folder, client_proc) -> None:
        """`ss` views of the connection while it is up (subflows, MPTCP and TCP info)."""
        deadline = time.monotonic() + 5
        while client_proc.running() and time.monotonic() < deadline and not self.established(nodes[0], port):
            time.sleep(0.01)
        for node in nodes:
            if node in self.seats:
                guest = self.seats[node].guest
                (folder / f"ss-{node}.txt").write_text(guest.sh(
                    f"{IP} mptcp limits show; {IP} mptcp endpoint show; cat /proc/net/tcp /proc/net/tcp6",
                    check=False))
                continue
            ns = self.net.netns(node)
            text = []
            for argv in (["ss", "-tniH", f"( sport = :{port} or dport = :{port} )"], ["ss", "-Mni"]):
                text.append(f"$ {' '.join(argv)}\n{run(argv, netns=ns, check=False).stdout}")
            (folder / f"ss-{node}.txt").write_text("\n".join(text))


def family_of(addr: str) -> int:
    return ipaddress.ip_address(addr.split("%")[0]).version
