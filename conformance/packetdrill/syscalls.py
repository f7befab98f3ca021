"""The system calls a script makes, on real sockets of the kernel under test.

A script names file descriptors by the numbers packetdrill would get (3, 4, ...); here they map
to the live sockets. `...` arguments are filled the way packetdrill fills them: the variant's
address family, the wildcard address and port 8080 for bind, the remote address for connect, a
zero-filled buffer for write."""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import os
import select
import socket
import struct
from typing import Any

from conformance.packetdrill.script import Call, Or, ScriptError, Struct, Sym, Syscall
from conformance.packetdrill.variants import PORT, Variant

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
CONSTANTS: dict[str, int] = {
    "IPPROTO_MPTCP": IPPROTO_MPTCP, "SOL_MPTCP": SOL_MPTCP, "SOL_TCP": socket.IPPROTO_TCP,
    "POLLRDHUP": 0x2000, "MSG_ZEROCOPY": 0x4000000, "MPTCP_INFO": 1, "TCP_IS_MPTCP": 43,
    "NULL": 0,
}
for _mod, _prefixes in ((socket, ("AF_", "SOCK_", "SOL_", "SO_", "IPPROTO_", "TCP_", "MSG_", "SHUT_", "IP_",
                                  "IPV6_")),
                        (os, ("O_",)), (fcntl, ("F_",)), (select, ("POLL",))):
    for _name in dir(_mod):
        if _name.startswith(_prefixes) and isinstance(getattr(_mod, _name), int):
            CONSTANTS.setdefault(_name, getattr(_mod, _name))
ERRNO_NAMES = errno_mod.errorcode
for _code, _name in ERRNO_NAMES.items():  # getsockopt(SO_ERROR) values are written as errno names
    CONSTANTS.setdefault(_name, _code)


class SyscallMismatch(Exception):
    """The call returned something other than the script says."""


def value(expr: Any) -> Any:
    """A syscall argument as a Python value (constants resolved, `a|b` or-ed)."""
    if isinstance(expr, Sym):
        if expr.name not in CONSTANTS:
            raise ScriptError(f"unknown constant {expr.name}")
        return CONSTANTS[expr.name]
    if isinstance(expr, Or):
        out = 0
        for t in expr.terms:
            out |= value(t)
        return out
    if isinstance(expr, list):
        return [value(e) for e in expr]
    return expr


class Syscalls:
    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.fds: dict[int, socket.socket] = {}

    def close_all(self) -> None:
        for s in self.fds.values():
            with contextlib.suppress(OSError):
                s.close()
        self.fds.clear()

    def sock(self, fd: Any) -> socket.socket:
        if fd not in self.fds:
            raise SyscallMismatch(f"fd {fd} is not open in this script")
        return self.fds[fd]

    def family(self) -> int:
        return socket.AF_INET6 if self.variant.socket_v6 else socket.AF_INET

    def run(self, call: Syscall) -> tuple[int, str | None, dict]:
        """Perform `call`: (return value, errno name or None, details for the expected values)."""
        handler = getattr(self, f"sys_{call.name}", None)
        if handler is None:
            raise ScriptError(f"unsupported system call {call.name}()")
        try:
            return handler(call, *call.args)
        except OSError as exc:
            return -1, ERRNO_NAMES.get(exc.errno, str(exc.errno)), {}

    # -- sockets --------------------------------------------------------------------------------
    def sys_socket(self, call, domain, type_, proto):
        fam = self.family() if domain is Ellipsis else value(domain)
        s = socket.socket(fam, value(type_), value(proto))
        self.fds[call.result] = s
        return call.result, None, {}

    def sys_setsockopt(self, call, fd, level, name, val, _length=None):
        v = value(val)
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], int):
            data: Any = v[0]
        elif isinstance(val, Struct):
            # {l_onoff=1, l_linger=0} and friends: ints in declaration order
            data = struct.pack(f"{len(val.named)}i", *(value(x) for x in val.named.values()))
        elif isinstance(v, str):
            data = v.encode()
        else:
            data = v
        self.sock(fd).setsockopt(value(level), value(name), data)
        return 0, None, {}

    def sys_getsockopt(self, call, fd, level, name, val, _length=None):
        got = self.sock(fd).getsockopt(value(level), value(name))
        want = value(val)
        if isinstance(want, list) and want and isinstance(want[0], int) and got != want[0]:
            raise SyscallMismatch(f"getsockopt value: expected {want[0]}, got {got}")
        return 0, None, {}

    def sys_bind(self, call, fd, addr, _length):
        host = "::" if self.variant.socket_v6 else "0.0.0.0"
        self.sock(fd).bind((host, PORT))
        return 0, None, {}

    def sys_listen(self, call, fd, backlog):
        self.sock(fd).listen(value(backlog))
        return 0, None, {}

    def sys_accept(self, call, fd, _addr, _length):
        conn, _ = self.sock(fd).accept()
        if isinstance(call.result, int) and call.result >= 0:
            self.fds[call.result] = conn
            return call.result, None, {}
        n = max(self.fds) + 1
        self.fds[n] = conn
        return n, None, {}

    def sys_connect(self, call, fd, _addr, _length):
        err = self.sock(fd).connect_ex((self.variant.sockaddr(self.variant.remote_ip), PORT))
        if err:
            return -1, ERRNO_NAMES.get(err, str(err)), {}
        return 0, None, {}

    def sys_close(self, call, fd):
        self.sock(fd).close()
        del self.fds[fd]
        return 0, None, {}

    def sys_shutdown(self, call, fd, how):
        self.sock(fd).shutdown(value(how))
        return 0, None, {}

    def sys_fcntl(self, call, fd, cmd, arg=None):
        f = self.sock(fd).fileno()
        if arg is None:
            return fcntl.fcntl(f, value(cmd)), None, {}
        return fcntl.fcntl(f, value(cmd), value(arg)), None, {}

    # -- data -----------------------------------------------------------------------------------
    def sys_read(self, call, fd, _buf, count):
        return len(os.read(self.sock(fd).fileno(), value(count))), None, {}

    def sys_recv(self, call, fd, _buf, count, flags=0):
        return len(self.sock(fd).recv(value(count), value(flags))), None, {}

    def sys_write(self, call, fd, _buf, count):
        return os.write(self.sock(fd).fileno(), bytes(value(count))), None, {}

    def sys_send(self, call, fd, _buf, count, flags=0):
        return self.sock(fd).send(bytes(value(count)), value(flags)), None, {}

    def sys_recvmsg(self, call, fd, msg, flags):
        size = 0
        if isinstance(msg, Struct):
            for iov in msg.named.get("msg_iov", []):
                if isinstance(iov, Struct):
                    size += value(iov.named.get("iov_len", iov.positional[-1] if iov.positional else 0))
        data, _, got_flags, _ = self.sock(fd).recvmsg(size, 0, value(flags))
        want = msg.named.get("msg_flags") if isinstance(msg, Struct) else None
        if want is not None and want is not Ellipsis and value(want) != got_flags:
            raise SyscallMismatch(f"recvmsg msg_flags: expected {value(want):#x}, got {got_flags:#x}")
        return len(data), None, {}

    def sys_poll(self, call, fds, nfds, timeout):
        p = select.poll()
        wanted = {}
        for entry in fds:
            if not isinstance(entry, Struct):
                raise ScriptError("poll(): expected [{fd=N, events=..., revents=...}]")
            fd = value(entry.named["fd"])
            p.register(self.sock(fd).fileno(), value(entry.named.get("events", 0)))
            wanted[self.sock(fd).fileno()] = (fd, entry.named.get("revents"))
        ready = dict(p.poll(value(timeout)))
        for f, (fd, revents) in wanted.items():
            if revents is not None and value(revents) != ready.get(f, 0):
                raise SyscallMismatch(f"poll fd {fd} revents: expected {value(revents):#x}, "
                                      f"got {ready.get(f, 0):#x}")
        return len(ready), None, {}


def expected_result(call: Syscall) -> int:
    v = value(call.result)
    if isinstance(v, int):
        return v
    if isinstance(call.result, Call):
        raise ScriptError(f"{call.name}(): a function call is not a return value")
    return v
