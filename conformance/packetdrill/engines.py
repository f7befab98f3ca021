"""Running a script in one variant with one engine, each run in a network namespace of its own.

`python`: our interpreter (conformance.packetdrill.interpreter), in a child of this process
moved into the namespace. `packetdrill`: the MPTCP fork of packetdrill, found
on PATH or at $PACKETDRILL (never shipped or built by this project; it needs AF_ALG hashing, see
docs/packetdrill.md). `auto`: the real tool when a usable one is present, else ours.

Either way the result is a `Result`; the namespace, and whatever the script started in it, is
gone afterwards (names carry the run's prefix, so a killed run's leftovers are swept)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path

from conformance.errors import InputError
from conformance.net.names import netns_name, remove_netns, run_tmpdir
from conformance.packetdrill.outcome import Result
from conformance.packetdrill.script import Script
from conformance.packetdrill.variants import VARIANTS
from conformance.proc import PR_SET_PDEATHSIG, _libc, _setns_fd, netns_path

ENGINES = ("auto", "packetdrill", "python")
MODES = ("strict", "rfc")
TIMEOUT_S = 60


@cache
def packetdrill_binary() -> tuple[str | None, str]:
    """(path of a usable MPTCP packetdrill, or None; why not). Usable: it runs, knows the MPTCP
    dialect, and can hash (the fork uses AF_ALG unless rebuilt against a userspace library)."""
    path = os.environ.get("PACKETDRILL") or shutil.which("packetdrill")
    if not path:
        return None, "no packetdrill binary on PATH and $PACKETDRILL is unset (the MPTCP fork is not packaged)"
    if not os.access(path, os.X_OK):
        return None, f"{path} is not executable"
    probe = run_tmpdir() / "probe-mptcp.pkt"
    probe.write_text("0 socket(..., SOCK_STREAM, IPPROTO_MPTCP) = 3\n"
                     "+0 < S 0:0(0) win 65535 <mpcapable v1 flags[flag_h] nokey>\n")
    try:
        cp = subprocess.run([path, "--dry_run", str(probe)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} does not run: {exc}"
    finally:
        probe.unlink(missing_ok=True)
    text = cp.stdout + cp.stderr
    if cp.returncode != 0 and ("syntax error" in text or "parse" in text.lower()):
        return None, f"{path} is not the MPTCP fork (it rejects mpcapable): {text.strip()[:200]}"
    if not _af_alg_works() and "AF_ALG" in _strings(path):
        return None, (f"{path} hashes through AF_ALG, which this kernel lacks (CONFIG_CRYPTO_USER_API_HASH); "
                      "rebuild it with a userspace SHA-256/HMAC")
    return path, ""


def _af_alg_works() -> bool:
    import socket
    try:
        s = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
        s.bind(("hash", "sha256"))
        s.close()
        return True
    except OSError:
        return False


def _strings(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return " ".join(m.decode() for m in re.findall(rb"[ -~]{6,}", data))


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InputError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "packetdrill" if packetdrill_binary()[0] else "python"
    return engine


def run(script: Script, variant: str, engine: str = "auto", mode: str = "strict") -> Result:
    """Run `script` once, in `variant`, in a fresh namespace."""
    if mode not in MODES:
        raise InputError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if variant not in VARIANTS:
        raise InputError(f"--variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    engine = resolve_engine(engine)
    base = Result("error", script=str(script.path), variant=variant, engine=engine, mode=mode,
                  requirements=script.requirements)
    if script.engines and engine not in script.engines:
        base.verdict = "skip"
        base.message = f"the script runs under {', '.join(script.engines)} only" + (
            f": {script.engines_why}" if script.engines_why else "")
        return base
    if engine == "packetdrill":
        binary, why = packetdrill_binary()
        if binary is None:
            base.verdict, base.message = "skip", why
            return base
        if mode != "strict":
            base.verdict, base.message = "skip", "the packetdrill engine judges byte for byte only (--mode strict)"
            return base
    ns = netns_name("pkt")
    from pyroute2 import netns as pr_netns

    pr_netns.create(ns)
    folder = run_tmpdir() / ns
    folder.mkdir(exist_ok=True)
    t0 = time.monotonic()
    try:
        if engine == "python":
            return _run_python(script, variant, mode, ns, folder, base)
        return _run_packetdrill(script, variant, ns, folder, base, binary)
    finally:
        remove_netns(ns)
        shutil.rmtree(folder, ignore_errors=True)
        base.seconds = base.seconds or time.monotonic() - t0


def _run_python(script: Script, variant: str, mode: str, ns: str, folder: Path, base: Result) -> Result:
    """Our interpreter in a child forked from this process (the parser, scapy and the codec are
    loaded already: a fresh interpreter would spend most of a short script importing them),
    moved into the namespace and given a process group of its own; the outcome comes back as
    JSON over a pipe."""
    from conformance.packetdrill.interpreter import run_script

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            fd = os.open(netns_path(ns), os.O_RDONLY)
            _setns_fd(fd)
            os.close(fd)
            data = asdict(run_script(script, VARIANTS[variant], mode))
        except BaseException as exc:  # reported, never raised in a forked copy of the caller
            data = {"verdict": "error", "message": f"the python engine crashed: {type(exc).__name__}: {exc}"}
            code = 1
        try:
            payload = json.dumps(data).encode()
            while payload:
                payload = payload[os.write(write_end, payload):]
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                base.message = f"the python engine did not finish in {TIMEOUT_S} s"
                return base
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its group: commands the script left running go too
        os.waitpid(pid, 0)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        base.message = "the python engine died without an outcome"
        return base
    for k, v in data.items():
        setattr(base, k, v)
    return base


_PD_ERROR = re.compile(r"^(?P<file>[^:\n]+\.pkt):(?P<line>\d+):\s*(?P<msg>.*)$", re.MULTILINE)


def _run_packetdrill(script: Script, variant: str, ns: str, folder: Path, base: Result, binary: str) -> Result:
    v = VARIANTS[variant]
    # As upstream's runner prepares a namespace: loopback up, MPTCP on.
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "net.mptcp.enabled=1"], check=False,
                   capture_output=True)
    argv = [binary, "--send_omit_free", *v.packetdrill_args(), script.path.name]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(["ip", "netns", "exec", ns, *argv], cwd=script.path.parent, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        base.message = f"packetdrill did not finish in {TIMEOUT_S} s"
        return base
    finally:
        base.seconds = time.monotonic() - t0
    text = (cp.stderr + cp.stdout).strip()
    if cp.returncode == 0:
        base.verdict = "pass"
        return base
    m = _PD_ERROR.search(text)
    base.verdict = "fail"
    if m:
        base.line, base.message = int(m.group("line")), m.group("msg")
    else:
        base.message = text.splitlines()[-1] if text else f"exit {cp.returncode}"
    scripted = re.search(r"^script packet:\s*(.*)$", text, re.MULTILINE)
    actual = re.search(r"^actual packet:\s*(.*)$", text, re.MULTILINE)
    base.expected = scripted.group(1) if scripted else ""
    base.seen = actual.group(1) if actual else ""
    base.kind = ("timing" if "timing error" in base.message else "mismatch" if actual else
                 "timeout" if "timed out" in base.message else "syscall" if "returned" in base.message else "fail")
    if "syntax error" in text or "parse error" in text:
        base.verdict = "error"
    with contextlib.suppress(OSError):
        (folder / "packetdrill.out").write_text(text)
    return base
