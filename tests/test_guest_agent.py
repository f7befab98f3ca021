"""The guest agent (conformance/endpoints/guest/agent.c): its transfer program must be the Python
endpoint's twin (same streams, same report, interoperable both ways over MPTCP and TCP), and its
control loop must carry out what the host asks of a guest.

Everything that opens a socket or a link runs in a network namespace of its own (`unshare --net`):
the body is a function of this module, run there by a fresh interpreter, that returns what it saw
as JSON; the assertions stay here, where pytest explains them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conformance.endpoints.transfer import _INFO_FIELDS, _INFO_FMT, BLOCK, Expected, digest, stream

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "conformance" / "endpoints" / "guest" / "agent.c"
PY_TRANSFER = [sys.executable, "-m", "conformance.endpoints.transfer"]
# Loads this file as a module in the namespace's interpreter and prints what the named function returns.
_BOOT = ("import importlib.util, json, sys\n"
         "spec = importlib.util.spec_from_file_location('guest_agent_inside', sys.argv[1])\n"
         "mod = importlib.util.module_from_spec(spec)\n"
         "spec.loader.exec_module(mod)\n"
         "print(json.dumps(getattr(mod, sys.argv[2])(*sys.argv[3:])))\n")

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                                reason="network namespaces need root, unshare and ip")


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The agent, built once as the guest image builds it (static, so it needs libc.a)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("agent") / "agent"
    cp = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(out), str(SOURCE)],
                        capture_output=True, text=True, timeout=120)
    if cp.returncode != 0 and re.search(r"cannot find -l(c|pthread)\b", cp.stderr):
        pytest.skip("no static libc to link the agent with (Debian: libc6-dev)")
    assert cp.returncode == 0, cp.stderr
    # A warning in the guest's only helper is a bug waiting: the build must be clean.
    assert cp.stderr == "", cp.stderr
    return str(out)


def _inside(function: str, *args: str, mount: bool = False, timeout: float = 60) -> Any:
    """`function(*args)` of this module run in a new network namespace (and mount namespace)."""
    cmd = ["unshare", "--net", *(["--mount"] if mount else []), sys.executable, "-c", _BOOT, __file__, function,
           *args]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr[-4000:]
    return json.loads(cp.stdout)


# -- the byte streams ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 3, 5, 1000, BLOCK, BLOCK + 7, 3 * BLOCK + 2])
def test_the_streams_are_pythons_bit_for_bit(agent: str, size: int) -> None:
    # Sizes off a multiple of 4 exercise getrandbits' shortened last word, those past BLOCK its
    # per-block calls: either wrong would only show as a mismatch deep into a transfer.
    for role in ("client", "server"):
        got = subprocess.run([agent, "stream", role, str(size)], capture_output=True, check=True).stdout
        assert got == b"".join(stream(role, size)), (role, size)


# -- transfer: interoperation with the Python endpoint ------------------------------------------

def _lo_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _pair(folder: Path, name: str, server: list[str], client: list[str], server_args: list[str],
          client_args: list[str]) -> dict:
    """One exchange between the `server` and `client` programs (argv prefixes) with these arguments."""
    reports = {role: folder / f"{name}-{role}.json" for role in ("server", "client")}
    srv = subprocess.Popen([*server, "server", *server_args, "--report", str(reports["server"])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stderr is not None
    line = srv.stdout.readline()
    assert line == "listening\n", (name, line, srv.stderr.read())
    cli = subprocess.run([*client, "client", *client_args, "--report", str(reports["client"])],
                         capture_output=True, text=True, timeout=30)
    srv_rc = srv.wait(30)
    out: dict = {"rc": {"server": srv_rc, "client": cli.returncode}, "stderr": cli.stderr + srv.stderr.read()}
    for role, path in reports.items():
        out[f"{role}_text"] = path.read_text()
        out[role] = json.loads(out[f"{role}_text"])
    return out


def inside_interop(agent: str, folder: str) -> dict:
    """Agent ↔ Python both ways over MPTCP (the second with two subflows), and over TCP."""
    _lo_up()
    # A second address for the client's subflow: everything 127/8 is local to lo.
    subprocess.run(["ip", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2"], check=True)
    subprocess.run(["ip", "mptcp", "endpoint", "add", "127.0.0.2", "dev", "lo", "subflow"], check=True)
    base, ag = Path(folder), [agent, "transfer"]
    big, small = str(3 * BLOCK + 5), str(2 * BLOCK + 3)
    sends_big = ["--send", big, "--expect", small]
    sends_small = ["--send", small, "--expect", big]
    at = ["--addr", "127.0.0.1", "--port"]
    return {
        "agent_server": _pair(base, "agent_server", ag, PY_TRANSFER, [*at, "5201", *sends_big],
                              [*at, "5201", *sends_small]),
        # Both sides hold their bulk back until the client's second subflow is there.
        "agent_client": _pair(base, "agent_client", PY_TRANSFER, ag,
                              [*at, "5202", "--wait-subflows", "2", *sends_big],
                              [*at, "5202", "--wait-subflows", "2", *sends_small]),
        # A dual-stack listener reached over IPv4: the addresses it reports are v4-mapped.
        "tcp": _pair(base, "tcp", ag, PY_TRANSFER, ["--addr", "::", "--port", "5203", "--tcp", *sends_small],
                     [*at, "5203", "--tcp", *sends_big]),
    }


def _agent_keys(python_report: dict) -> list[str]:
    """The keys the agent's report has where the Python one has these: MPTCP_INFO stays raw."""
    return [f"{k}_raw" if k in ("mptcp_info", "mptcp_info_mid") else k for k in python_report]


def _unmapped(addr: list) -> list:
    """[host, port] with a v4-mapped IPv6 host as the IPv4 address its peer sees."""
    return [addr[0].removeprefix("::ffff:"), addr[1]]


def _decode(raw: str) -> dict:
    size = struct.calcsize(_INFO_FMT)
    return dict(zip(_INFO_FIELDS, struct.unpack(_INFO_FMT, bytes.fromhex(raw)[:size].ljust(size, b"\0")),
                    strict=True))


@needs_root
def test_the_agent_and_the_python_endpoint_exchange_streams_both_ways(agent: str, tmp_path: Path) -> None:
    runs = _inside("inside_interop", agent, str(tmp_path))
    for name, run in runs.items():
        agent_role = "client" if name == "agent_client" else "server"
        mine, theirs = run[agent_role], run["client" if agent_role == "server" else "server"]
        assert run["rc"] == {"server": 0, "client": 0}, (name, run["stderr"], mine, theirs)
        assert mine["ok"] and theirs["ok"], name
        assert mine["sha256_sent"] == theirs["sha256_received"] == theirs["sha256_expected"], name
        assert mine["sha256_received"] == theirs["sha256_sent"] == mine["sha256_expected"], name
        assert list(mine) == _agent_keys(theirs), name
        # Laid out as json.dump(indent=2) lays it out: a guest's report reads like a host's.
        assert json.dumps(mine, indent=2) == run[f"{agent_role}_text"], name
        assert _unmapped(mine["local"]) == theirs["peer"] and _unmapped(mine["peer"]) == theirs["local"], name
        if name == "tcp":
            assert mine["socket"] == "tcp" and mine["mptcp_info_raw"] is None and mine["fallback"] is True
            assert mine["mptcp"] is False and mine["subflows"] is None and mine["local"][0] == "::ffff:127.0.0.1"
            continue
        assert mine["mptcp"] is True and mine["fallback"] is False and mine["socket"] == "mptcp"
        info, mid = _decode(mine["mptcp_info_raw"]), _decode(mine["mptcp_info_mid_raw"])
        assert info["token"] != 0 and info["token"] == mid["token"], name
        assert info["bytes_received"] == mine["bytes_received"], name  # MPTCP-level bytes, every one
        # Mid-transfer, while data flows, the subflows are up (at the end the kernel may have
        # closed some already): both when the bulk waited for the second, one at least otherwise.
        # The kernel updates its two counts apart: a sample taken as a subflow comes or goes may
        # see them one apart (seen under load in CI), so the path manager's count decides.
        assert mid["subflows_total"] in (mid["subflows"], mid["subflows"] + 1), (name, mid)
        assert mid["subflows"] + 1 in ((2,) if name == "agent_client" else (1, 2)), (name, mid)
        if agent_role == "server":  # every live subflow is this listener's (torn-down ones show 0.0.0.0)
            live = [sf for sf in mine["subflows"] if sf["local"]["addr"] not in ("0.0.0.0", "::")]
            assert {sf["local"]["port"] for sf in live} <= {mine["local"][1]}, (name, mine["subflows"])
    two = runs["agent_client"]["client"]
    # Both were up before the bulk; at the end the kernel may have closed one already (seen under load).
    assert two["subflows_before_bulk"] == 2 and len(two["subflows"]) in (1, 2)
    # A subflow being torn down as the report is taken shows the unspecified address, and by then
    # every one may be (both seen in CI): the live ones are on the two addresses.
    addrs = {sf["local"]["addr"] for sf in two["subflows"]} - {"0.0.0.0", "::"}
    assert addrs <= {"127.0.0.1", "127.0.0.2"}, two["subflows"]


# -- transfer: a stream that went wrong, an abortive close, a SIGTERM ---------------------------

SIZE = 300_000


def _feeder(data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A TCP server on 127.0.0.1 that sends `data` and reads what comes to its end."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return lsock, thread


def inside_mismatch(agent: str, folder: str) -> dict:
    """The agent as a client of servers that send the wrong bytes."""
    _lo_up()
    right = b"".join(stream("server", SIZE))
    flipped = bytearray(right)
    flipped[123_457] ^= 0x40
    wrongs = {"flipped": bytes(flipped), "other_role": b"".join(stream("client", SIZE)), "excess": right + b"xyz"}
    out = {}
    for name, data in wrongs.items():
        lsock, thread = _feeder(data)
        report, saved = Path(folder) / f"{name}.json", Path(folder) / f"{name}.bin"
        cp = subprocess.run([agent, "transfer", "client", "--tcp", "--addr", "127.0.0.1",
                             "--port", str(lsock.getsockname()[1]), "--send", "5000", "--expect", str(SIZE),
                             "--report", str(report), "--save-mismatch", str(saved)],
                            capture_output=True, text=True, timeout=30)
        thread.join(10)
        lsock.close()
        # What the Python endpoint would have made of the same bytes.
        reference = Expected("server", SIZE)
        reference.compare(data)
        out[name] = {"rc": cp.returncode, "report": json.loads(report.read_text()),
                     "first_difference": reference.first_difference,
                     "saved_is_data": saved.exists() and saved.read_bytes() == data[:SIZE]}
    return out


@needs_root
def test_a_wrong_stream_is_located_and_saved(agent: str, tmp_path: Path) -> None:
    runs = _inside("inside_mismatch", agent, str(tmp_path))
    assert runs["flipped"]["first_difference"] == 123_457
    for name, run in runs.items():
        report = run["report"]
        assert run["rc"] == 1 and report["ok"] is False, name
        assert report["first_difference"] == run["first_difference"], name
        assert report["sha256_expected"] == digest("server", SIZE), name
        assert report["received_saved"] == str(tmp_path / f"{name}.bin") and run["saved_is_data"], name
    flipped = runs["flipped"]["report"]
    want = bytearray(b"".join(stream("server", SIZE)))
    want[123_457] ^= 0x40
    # Python samples only within the chunk that differed: at most 32 bytes, from the first difference.
    sample = flipped["difference_sample"]
    assert sample and want[123_457:123_457 + 32].hex().startswith(sample)
    excess = runs["excess"]["report"]
    assert excess["first_difference"] == SIZE and excess["difference_sample"] is None
    assert excess["bytes_received"] == SIZE + 3


def inside_abort_and_stop(agent: str, folder: str) -> dict:
    """An agent client that aborts mid-stream (and a Python one, for its report's keys), then an
    agent server that the harness stops while its peer neither sends nor closes."""
    _lo_up()
    base, out = Path(folder), {}
    for name, prog, port in (("agent", [agent, "transfer"], "5210"), ("python", PY_TRANSFER, "5211")):
        at = ["--addr", "127.0.0.1", "--port", port]
        out[name] = _pair(base, f"abort-{name}", PY_TRANSFER, prog,
                          [*at, "--send", str(4 * BLOCK), "--expect", "1000"],
                          [*at, "--send", "1000", "--expect", str(4 * BLOCK), "--abort-after", "300000"])
    report = base / "stopped.json"
    srv = subprocess.Popen([agent, "transfer", "server", "--addr", "127.0.0.1", "--port", "5212",
                            "--expect", "3000", "--report", str(report), "--timeout", "30"],
                           stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline() == "listening\n"
    with socket.create_connection(("127.0.0.1", 5212)) as c:
        c.sendall(b"x" * 1000)
        time.sleep(0.3)
        srv.send_signal(signal.SIGTERM)
        out["stopped"] = {"rc": srv.wait(10), "report": json.loads(report.read_text())}
    return out


@needs_root
def test_an_abortive_close_and_a_sigterm_report_as_in_python(agent: str, tmp_path: Path) -> None:
    runs = _inside("inside_abort_and_stop", agent, str(tmp_path))
    mine, theirs = runs["agent"]["client"], runs["python"]["client"]
    assert runs["agent"]["rc"]["client"] == 0 and mine["ok"] is True, runs["agent"]
    assert list(mine) == _agent_keys(theirs)
    assert mine["aborted_after"] == mine["bytes_received"] >= 300_000
    assert mine["sha256_expected"] == digest("server", 4 * BLOCK, prefix=mine["bytes_received"])
    assert mine["mptcp_info_raw"] and _decode(mine["mptcp_info_raw"])["token"] != 0
    stopped = runs["stopped"]
    assert stopped["rc"] == 1
    report = stopped["report"]
    assert report["bytes_received"] == 1000 and report["ok"] is False
    assert report["receive_error"] == "Stopped: stopped by the harness (SIGTERM)"
    assert report["send_error"] is None and report["bytes_sent"] == 0  # nothing to send: all of it sent


# -- serve: the control loop ---------------------------------------------------------------------

class _Agent:
    """`agent serve -` driven through its stdin and stdout, as the host drives the serial port."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([path, "serve", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ids = iter(range(1, 1 << 30))

    def send(self, raw: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(raw)
        self.proc.stdin.flush()

    def reply(self) -> list:
        """[id, rc, output] of the next answer (the output's length is the header's, exactly)."""
        assert self.proc.stdout is not None
        header = self.proc.stdout.readline().decode()
        m = re.fullmatch(r"=(\S+) (-?\d+) (\d+)\n", header)
        assert m, header
        body = self.proc.stdout.read(int(m.group(3)))
        assert len(body) == int(m.group(3))
        return [m.group(1), int(m.group(2)), body.decode(errors="replace")]

    def call(self, verb: str, rest: str = "") -> list:
        """[rc, output] of one request, sent as the host sends it."""
        rid = str(next(self.ids))
        self.send(f"{rid} {verb} {rest}".rstrip().encode() + b"\n")
        got_id, rc, body = self.reply()
        assert got_id == rid, (got_id, rid)
        return [rc, body]


def _links(text: str) -> set[str]:
    """Link names in `ip -o link` output (a veth end shows as name@peer)."""
    return {line.split(": ")[1].split("@")[0] for line in text.splitlines() if ": " in line}


def _poll_until_done(a: _Agent, tag: str) -> list:
    deadline = time.monotonic() + 10
    while (got := a.call("poll", tag))[0] == 255 and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def inside_serve(agent: str) -> dict:
    """A session with the control loop; what each request answered, and what the namespaces held."""
    _lo_up()
    # /run/bg is the agent's: a private /run keeps it off the host's.
    subprocess.run(["mount", "-t", "tmpfs", "run", "/run"], check=True)
    a, out = _Agent(agent), {}
    out["ping"] = a.call("ping")
    out["sh"] = a.call("sh", "echo out; echo err >&2; exit 3")
    out["sh_signal"] = a.call("sh", "kill -9 $$")
    t0 = time.monotonic()
    # A job the shell leaves behind keeps the output pipe open: the answer must not wait for it.
    out["sh_background"] = a.call("sh", "sleep 5 & echo done")
    out["sh_background_s"] = time.monotonic() - t0
    out["bg"] = a.call("bg", "t1 sleep 30")
    out["bg_running"] = a.call("poll", "t1")
    out["kill"] = a.call("kill", "t1 15")
    out["bg_killed"] = _poll_until_done(a, "t1")
    out["bg_again"] = a.call("poll", "t1")
    out["bg_exit"] = a.call("bg", "t2 echo hello; echo oops >&2; exit 5")
    out["bg_exit_done"] = _poll_until_done(a, "t2")
    out["bg_files"] = [Path("/run/bg/t2.out").read_text(), Path("/run/bg/t2.err").read_text()]
    out["poll_unknown"] = a.call("poll", "nope")
    out["kill_unknown"] = a.call("kill", "nope 9")
    # Malformed requests, then one sent in pieces and two in one write (a device's short reads).
    a.send(b"garbage\n")
    out["no_verb"] = a.reply()
    for name, request in (("unknown_verb", "frob"), ("ping_args", "ping extra"), ("sh_empty", "sh"),
                          ("kill_bad", "kill t1 TERM"), ("bg_bad_tag", "bg ../x true")):
        verb, _, rest = request.partition(" ")
        out[name] = a.call(verb, rest)
    a.send(b"100 pi")
    time.sleep(0.05)
    a.send(b"ng\n101 ping\n")
    out["pieces"] = [a.reply(), a.reply()]

    # Links to move: dummies where the kernel has them, else a veth pair.
    if subprocess.run(["ip", "link", "add", "d0", "type", "dummy"], capture_output=True).returncode == 0:
        subprocess.run(["ip", "link", "add", "d1", "type", "dummy"], check=True)
    else:
        subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
    a.call("bg", "t3 sleep 30")
    own = os.readlink("/proc/self/ns/net")
    for case in ("first", "second"):
        got = a.call("netns")
        holder = int(got[1]) if got[0] == 0 else 0
        out[case] = {
            "netns": got,
            "holder_ns_differs": os.readlink(f"/proc/{holder}/ns/net") != own if holder else None,
            "case_links": a.call("sh", "ip -o link")[1],
            "case_lo": a.call("sh", "ip -o link show lo")[1],
            "case_addrs": a.call("sh", "ip -o addr show dev lo")[1],
            "initial_links": subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout,
        }
        if case == "first":
            out["bg_killed_by_netns"] = a.call("poll", "t3")
            # Left in the first case: a link of its own (comes back and moves on), an address (goes with it).
            out["first"]["setup"] = a.call("sh", "ip link add d2 type veth peer name d3 && "
                                                 "ip addr add 10.9.9.9/32 dev lo")
            out["first"]["holder"] = holder
    out["old_holder_gone"] = not Path(f"/proc/{out['first']['holder']}").exists()
    out["quit"] = a.call("quit")
    out["exit"] = a.proc.wait(10)
    return out


@needs_root
def test_the_control_loop(agent: str) -> None:
    got = _inside("inside_serve", agent, mount=True)
    assert got["ping"] == [0, "pong"]
    assert got["sh"][0] == 3 and got["sh"][1].split() == ["out", "err"]
    assert got["sh_signal"] == [137, ""]
    assert got["sh_background"] == [0, "done\n"] and got["sh_background_s"] < 3
    assert got["bg"][0] == 0 and int(got["bg"][1]) > 1
    assert got["bg_running"] == [255, "running"]
    assert got["kill"] == [0, ""]
    assert got["bg_killed"] == [128 + 15, ""] and got["bg_again"] == [128 + 15, ""]
    assert got["bg_exit"][0] == 0 and got["bg_exit_done"] == [5, ""]
    assert got["bg_files"] == ["hello\n", "oops\n"]
    assert got["poll_unknown"][0] == 254 and got["kill_unknown"][0] == 254
    assert got["no_verb"][:2] == ["garbage", 253] and "\n" not in got["no_verb"][2]
    for name in ("unknown_verb", "ping_args", "sh_empty", "kill_bad", "bg_bad_tag"):
        assert got[name][0] == 253 and got[name][1] and "\n" not in got[name][1], (name, got[name])
    assert got["pieces"] == [["100", 0, "pong"], ["101", 0, "pong"]]

    first, second = got["first"], got["second"]
    for case in (first, second):
        assert case["netns"][0] == 0 and case["holder_ns_differs"], case
        assert "UP" in case["case_lo"].split("<")[1].split(">")[0].split(","), case["case_lo"]
        assert _links(case["initial_links"]) == {"lo"}, case["initial_links"]
    assert _links(first["case_links"]) == {"lo", "d0", "d1"}
    assert got["bg_killed_by_netns"] == [128 + 9, ""]
    assert first["setup"][0] == 0, first["setup"]
    assert "10.9.9.9" not in second["case_addrs"]  # a fresh namespace: the last case's address went with it
    assert _links(second["case_links"]) == {"lo", "d0", "d1", "d2", "d3"}
    assert second["netns"][1] != first["netns"][1] and got["old_holder_gone"]
    assert got["quit"] == [0, ""] and got["exit"] == 0
