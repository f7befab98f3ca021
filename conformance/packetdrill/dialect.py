"""The MPTCP fork's option dialect over our codec: script options built into wire options (what
the script sends) and wire options judged against script options (what the kernel sent).

Values the script leaves to the tool are worked out here as packetdrill does: keys bound to
variables (fixed by the script, learned from the kernel's packet, or made up for the script's
side), DSNs and Data ACKs relative to the sender's IDSN, tokens, nonces and HMACs from the keys."""

from __future__ import annotations

import hashlib
import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from conformance.packetdrill.script import Call, Option, ScriptError
from conformance.wire import (
    DSS,
    AddAddr,
    MPCapable,
    MPFail,
    MPFastclose,
    MPJoinAck,
    MPJoinSyn,
    MPJoinSynAck,
    MPPrio,
    MPTCPOption,
    MPTCPRst,
    RemoveAddr,
    crypto,
)

M64, M32 = 2**64 - 1, 2**32 - 1
DEFAULT_NONCE = 42  # the script side's MP_JOIN random number unless `rand=` says otherwise
SUBTYPE_OF = {"mpcapable": MPCapable, "dss": DSS, "add_address": AddAddr, "remove_address": RemoveAddr,
              "mp_join_syn": MPJoinSyn, "mp_join_syn_ack": MPJoinSynAck, "mp_join_ack": MPJoinAck,
              "mp_prio": MPPrio, "mp_fail": MPFail, "mp_fastclose": MPFastclose, "mp_reset": MPTCPRst}


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass
class Flow:
    """One subflow: the kernel's end, the script's end, the kernel's ISN, the nonces."""

    local: Endpoint
    remote: Endpoint
    local_isn: int | None = None
    remote_isn: int = 0
    local_nonce: int | None = None
    remote_nonce: int = DEFAULT_NONCE


class Mismatch(Exception):
    """An option or field of the kernel's packet differs from the script's."""


@dataclass
class State:
    """What a connection's MPTCP options depend on, learned as the script runs."""

    keys: dict[str, int] = field(default_factory=dict)
    addrs: dict[str, Endpoint] = field(default_factory=dict)
    script_key: int | None = None  # the key of the script's side
    kernel_key: int | None = None
    checksums: bool = False
    sha1: bool = False  # MPTCP v0
    next_addr_id: int = 1
    advertised: dict[str, int] = field(default_factory=dict)  # the kernel's ADD_ADDR: address -> ID
    notes: list[str] = field(default_factory=list)  # rfc mode: differences the RFC allows
    # the script's own ADD_ADDRs: address -> (port or None, whether its HMAC was right)
    announced: dict[str, tuple[int | None, bool]] = field(default_factory=dict)
    script_dsn64: bool = False  # the script has sent a 64-bit DSN

    # -- keys and values --------------------------------------------------------------------
    def key(self, name: str) -> int:
        if name not in self.keys:
            raise ScriptError(f"key variable {name} is used before it has a value")
        return self.keys[name]

    def eval(self, v: Any) -> int:
        """A dialect value: a number, or sha256_32(var) / sha1_32(var) / a key variable."""
        if isinstance(v, int):
            return v
        if isinstance(v, Call):
            if v.name in ("sha256_32", "sha1_32") and len(v.args) == 1:
                k = self.key(v.args[0]) if isinstance(v.args[0], str) else v.args[0]
                algo = hashlib.sha256 if v.name == "sha256_32" else hashlib.sha1
                return int.from_bytes(algo(k.to_bytes(8, "big")).digest()[:4], "big")
            raise ScriptError(f"unsupported function {v.name}() in an MPTCP option")
        if isinstance(v, str):
            return self.key(v)
        raise ScriptError(f"cannot evaluate {v!r}")

    def sequence(self, v: Any, base: int) -> int:
        """A DSN or Data ACK value: relative to `base` (an IDSN), or absolute when the script
        names a key's IDSN itself: `trunc_r64_hmac(KEY)` (the connection's hash), `_sha1` or
        `_sha256` (that hash), an optional second argument added to it."""
        if isinstance(v, Call) and v.name.startswith("trunc_r64_hmac"):
            if not v.args or not isinstance(v.args[0], str):
                raise ScriptError(f"{v.name}() takes a key variable (and a number to add)")
            key = self.key(v.args[0])
            sha1 = v.name.endswith("_sha1") or (self.sha1 and not v.name.endswith("_sha256"))
            digest = (hashlib.sha1 if sha1 else hashlib.sha256)(key.to_bytes(8, "big")).digest()
            extra = v.args[1] if len(v.args) > 1 and isinstance(v.args[1], int) else 0
            return (int.from_bytes(digest[-8:], "big") + extra) & M64
        return (base + self.eval(v)) & M64

    def idsn(self, key: int | None) -> int:
        if key is None:
            raise ScriptError("a DSN or Data ACK is used before both keys are known")
        if self.sha1:
            return int.from_bytes(hashlib.sha1(key.to_bytes(8, "big")).digest()[-8:], "big")
        return crypto.idsn(key)

    def script_idsn(self) -> int:
        return self.idsn(self.script_key)

    def kernel_idsn(self) -> int:
        return self.idsn(self.kernel_key)

    def token(self, key: int) -> int:
        if self.sha1:
            return int.from_bytes(hashlib.sha1(key.to_bytes(8, "big")).digest()[:4], "big")
        return crypto.token(key)

    # -- building what the script sends ----------------------------------------------------
    def build(self, opt: Option, flow: Flow, tcp_flags: str, seq: int, payload_len: int,
              new_remote) -> MPTCPOption:
        f = opt.fields
        n = opt.name
        if n == "mpcapable":
            self.sha1 = f["version"] == 0
            flags = f["flags"]
            if "S" in tcp_flags:
                self.checksums = self.checksums or bool(flags & 0x80)
            keys = f.get("keys", [])
            values = []
            for i, (name, fixed) in enumerate(keys):
                if fixed is not None:
                    self.keys[name] = fixed
                if name not in self.keys:
                    if i == 0:  # the sender's key: ours, made up once
                        self.keys[name] = self.script_key or random.getrandbits(64)
                    else:
                        raise ScriptError(f"key variable {name} has no value yet (the kernel's key is learned "
                                          f"from its own MP_CAPABLE)")
                values.append(self.keys[name])
            if values and self.script_key is None:
                self.script_key = values[0]
            kw: dict[str, Any] = {"version": f["version"], "flags": flags}
            if values:
                kw["sender_key"] = values[0]
            if len(values) > 1:
                kw["receiver_key"] = values[1]
            if "datalen" in f:
                kw["data_level_length"] = f["datalen"]
                if self.checksums:
                    kw["checksum"] = crypto.dss_checksum(self.script_idsn() + 1, 1, f["datalen"],
                                                         bytes(payload_len))
            return MPCapable(**kw)
        if n == "dss":
            return self._build_dss(f, flow, seq, payload_len)
        if n == "mp_join_syn":
            if "rand" in f:
                flow.remote_nonce = f["rand"]
            token = f.get("token", "auto")
            token = self.token(self.kernel_key) if token == "auto" else self.eval(token)
            return MPJoinSyn(backup=f.get("backup", 0), address_id=f.get("address_id") or 0,
                             receiver_token=token, sender_random=flow.remote_nonce)
        if n == "mp_join_syn_ack":
            if "rand" in f:
                flow.remote_nonce = f["rand"]
            hmac = f.get("hmac", "auto")
            if hmac == "auto":
                hmac = crypto.join_synack_hmac(self.script_key, self.kernel_key, flow.remote_nonce,
                                               self._nonce(flow))
            else:
                hmac = self.join_mac(hmac, flow.remote_nonce, self._nonce(flow), full=False)
            return MPJoinSynAck(backup=f.get("backup", 0), address_id=f.get("address_id") or 0,
                                sender_truncated_hmac=hmac, sender_random=flow.remote_nonce)
        if n == "mp_join_ack":
            hmac = f.get("hmac", "auto")
            if hmac == "auto":
                mac = crypto.join_hmac(self.script_key, self.kernel_key, flow.remote_nonce, self._nonce(flow))[:20]
            else:
                mac = self.join_mac(hmac, flow.remote_nonce, self._nonce(flow), full=True)
            return MPJoinAck(sender_hmac=mac)
        if n == "add_address":
            name, func = f["addr"]
            if func is not None:
                ep = Endpoint(_ip(func[1]), f.get("port") or flow.remote.port)
                self.addrs[name] = ep
            elif name not in self.addrs:
                self.addrs[name] = new_remote(f.get("port"))
            ep = self.addrs[name]
            addr_id = f.get("address_id")
            if addr_id is None:
                addr_id = self.next_addr_id
                self.next_addr_id += 1
            kw = {"echo": int(f["echo"]), "address_id": addr_id, "address": ep.ip}
            if f.get("port") is not None:
                kw["port"] = f["port"]
            if not f["echo"]:
                hmac = f.get("hmac", "auto")
                right = crypto.add_addr_hmac(self.script_key, self.kernel_key, addr_id,
                                             ipaddress.ip_address(ep.ip).packed, f.get("port"))
                kw["truncated_hmac"] = right if hmac == "auto" else hmac
                self.announced[ep.ip] = (f.get("port"), kw["truncated_hmac"] == right)
            return AddAddr(**kw)
        if n == "remove_address":
            return RemoveAddr(address_ids=f["ids"])
        if n == "mp_prio":
            return MPPrio(backup=f["backup"], **({"address_id": f["address_id"]} if "address_id" in f else {}))
        if n == "mp_fail":
            return MPFail(dsn=(self.kernel_idsn() + f["dsn"]) & M64)
        if n == "mp_fastclose":
            return MPFastclose(receiver_key=self._fastclose_key(f, self.kernel_key))
        if n == "mp_reset":
            return MPTCPRst(flags=0x1 if f["transient"] else 0, reason=f["reason"])
        raise ScriptError(f"option {n} cannot be sent")

    def join_mac(self, v: Any, own_nonce: int, peer_nonce: int, *, full: bool) -> Any:
        """An MP_JOIN HMAC the script spells out: a number, `trunc_l64_hmac(N)`, or computed from
        two named keys, `trunc_l64_hmac(a b)` / `full_160_hmac(a b)` (Key = a ‖ b, the sender's
        nonce first): how a script sends or expects a wrong one."""
        if isinstance(v, Call) and v.name in ("trunc_l64_hmac", "full_160_hmac"):
            if len(v.args) == 1 and isinstance(v.args[0], int):
                v = v.args[0]
            elif len(v.args) == 2:
                mac = crypto.join_hmac(self.key(str(v.args[0])), self.key(str(v.args[1])), own_nonce, peer_nonce)
                return mac[:20] if full else int.from_bytes(mac[:8], "big")
            else:
                raise ScriptError(f"{v.name}() takes a number or two key variables")
        value = self.eval(v)
        return value.to_bytes(20, "big") if full else value

    def _nonce(self, flow: Flow) -> int:
        if flow.local_nonce is None:
            raise ScriptError("an MP_JOIN HMAC is needed before the kernel's random number is known")
        return flow.local_nonce

    def _fastclose_key(self, f: dict, default: int | None) -> int:
        if "key" not in f:
            if default is None:
                raise ScriptError("mp_fastclose: the receiver's key is not known yet")
            return default
        name, fixed = f["key"]
        return fixed if fixed is not None else self.key(name)

    def _build_dss(self, f: dict, flow: Flow, seq: int, payload_len: int) -> DSS:
        flags, kw = 0, {}
        if "dack_bits" in f:
            flags |= 0x01 | (0x02 if f["dack_bits"] == 64 else 0)
            if "dack" not in f:
                raise ScriptError("an outgoing dack needs a value (dack8=N)")
            dack = self.sequence(f["dack"], self.kernel_idsn())
            kw["data_ack"] = dack if f["dack_bits"] == 64 else dack & M32
        if "dsn" in f:
            flags |= 0x04 | (0x08 if f["dsn_bits"] == 64 else 0)
            dsn = self.sequence(f["dsn"], self.script_idsn())
            self.script_dsn64 = self.script_dsn64 or f["dsn_bits"] == 64
            kw["dsn"] = dsn if f["dsn_bits"] == 64 else dsn & M32
            ssn = f.get("ssn", (seq - flow.remote_isn) & M32)
            dll = f.get("dll", payload_len)
            kw["ssn"], kw["data_level_length"] = ssn, dll
            if "checksum" not in f:  # left out: computed (packetdrill's rule)
                kw["checksum"] = crypto.dss_checksum(dsn, ssn, dll, bytes(min(dll, payload_len)))
            elif f["checksum"] is not None:
                kw["checksum"] = f["checksum"]
        if f.get("fin"):
            flags |= 0x10
        return DSS(flags=flags, **kw)

    # -- judging what the kernel sent ------------------------------------------------------
    def judge(self, opt: Option, live: MPTCPOption, flow: Flow, tcp_flags: str, *, strict: bool,
              payload: bytes) -> list[str]:
        """Differences between script option `opt` and the kernel's `live` option of the same
        subtype (empty: they agree); binds the variables the script left to the wire."""
        f, n, diffs = opt.fields, opt.name, []

        def same(what: str, want: Any, got: Any) -> None:
            if want != got:
                diffs.append(f"{n} {what}: expected {_show(want)}, got {_show(got)}")

        if n == "mpcapable":
            same("version", f["version"], live.version)
            self.sha1 = f["version"] == 0
            same("flags", f["flags"], int(live.flags))
            if "S" in tcp_flags:
                self.checksums = self.checksums or bool(int(live.flags) & 0x80)
            got = [v for v in (live.getfieldval("sender_key"), live.getfieldval("receiver_key")) if v is not None]
            keys = f.get("keys", [])
            if len(keys) != len(got):
                diffs.append(f"mpcapable keys: expected {len(keys)}, got {len(got)}")
            for i, ((name, fixed), value) in enumerate(zip(keys, got, strict=False)):
                if fixed is not None:
                    self.keys[name] = fixed
                if name not in self.keys:
                    self.keys[name] = value
                same(f"key {name}", self.keys[name], value)
                if i == 0 and self.kernel_key is None:
                    self.kernel_key = value
            if "datalen" in f:
                same("data-level length", f["datalen"], live.getfieldval("data_level_length"))
            return diffs
        if n == "dss":
            lf = int(live.flags)
            if "dack_bits" in f:
                if not lf & 0x01:
                    diffs.append("dss: expected a Data ACK, got none")
                else:
                    got_bits = 64 if lf & 0x02 else 32
                    if strict or (got_bits == 32 and self.script_dsn64):
                        # §3.3.2: data sent with 64-bit DSNs is acknowledged with 64 bits
                        same("Data ACK size", f["dack_bits"], got_bits)
                    elif got_bits != f["dack_bits"]:
                        self.notes.append(f"a {got_bits}-bit Data ACK where the script has {f['dack_bits']} "
                                          "(either width while no 64-bit DSN was sent, §3.3.2)")
                    if "dack" in f:
                        mask = M64 if got_bits == 64 and f["dack_bits"] == 64 else M32
                        base = self.script_idsn()
                        want = (self.sequence(f["dack"], base) - base) & mask
                        same("dack (relative to the script's IDSN)", want, (live.data_ack - base) & mask)
            elif lf & 0x01 and strict:
                diffs.append("dss: expected no Data ACK, got one")
            if "dsn" in f:
                if not lf & 0x04:
                    diffs.append("dss: expected a mapping, got none")
                else:
                    same("DSN size", f["dsn_bits"], 64 if lf & 0x08 else 32)
                    mask = M64 if lf & 0x08 else M32
                    base = self.kernel_idsn()
                    same("dsn (relative to the kernel's IDSN)", (self.sequence(f["dsn"], base) - base) & mask,
                         (live.dsn - base) & mask)
                    if "ssn" in f:
                        same("ssn", f["ssn"], live.ssn)
                    if "dll" in f:
                        same("dll", f["dll"], live.data_level_length)
                    has_cs = live.getfieldval("checksum") is not None
                    if "checksum" in f and f["checksum"] is None:
                        if has_cs:
                            diffs.append("dss: expected no checksum (nocs), got one")
                    elif "checksum" in f:
                        same("checksum", f["checksum"], live.checksum)
                    elif strict and not has_cs:
                        diffs.append("dss: expected a checksum, got none")
                    if has_cs and not strict:
                        dsn64, dll = (live.dsn if lf & 0x08 else None), live.data_level_length
                        if dsn64 is not None and dll and len(payload) >= dll \
                                and not crypto.dss_checksum_ok(dsn64, live.ssn, dll, payload[:dll], live.checksum):
                            diffs.append("dss: the checksum does not verify")
            elif lf & 0x04 and strict:
                diffs.append("dss: expected no mapping, got one")
            same("DATA_FIN", bool(f.get("fin")), bool(lf & 0x10))
            return diffs
        if n in ("mp_join_syn", "mp_join_syn_ack", "mp_join_ack"):
            if flow.local_nonce is None and n != "mp_join_ack":
                flow.local_nonce = live.sender_random
            if "rand" in f:
                same("rand", f["rand"], live.sender_random)
            if n != "mp_join_ack":
                if "backup" in f and f["backup"] != live.backup and not strict:
                    # §3.2: B is the sender's wish for this subflow, local policy either way
                    self.notes.append(f"{n} backup={live.backup} where the script has {f['backup']}")
                elif "backup" in f:
                    same("backup", f["backup"], live.backup)
                advertised = self.advertised.get(flow.local.ip)
                if f.get("address_id") is not None and f["address_id"] != live.address_id and not strict:
                    # §3.2/§3.4.1: the ID is the sender's own choice, but the one it advertised
                    # for this address with ADD_ADDR if it did
                    if advertised is not None and advertised != live.address_id:
                        diffs.append(f"{n} address_id: {live.address_id} for {flow.local.ip}, which the kernel "
                                     f"advertised with ID {advertised}")
                    else:
                        self.notes.append(f"{n} address_id={live.address_id} where the script has "
                                          f"{f['address_id']}" + (f" (the ID the kernel advertised for "
                                                                   f"{flow.local.ip})" if advertised is not None
                                                                  else ""))
                elif f.get("address_id") is not None:
                    same("address_id", f["address_id"], live.address_id)
            if n == "mp_join_syn":
                token = f.get("token", "auto")
                want = self.token(self.script_key) if token == "auto" else self.eval(token)
                same("token", want, live.receiver_token)
            elif n == "mp_join_syn_ack":
                hmac = f.get("hmac", "auto")
                want = (crypto.join_synack_hmac(self.kernel_key, self.script_key, live.sender_random,
                                                flow.remote_nonce) if hmac == "auto"
                        else self.join_mac(hmac, live.sender_random, flow.remote_nonce, full=False))
                same("sender_hmac", want, live.sender_truncated_hmac)
            else:
                hmac = f.get("hmac", "auto")
                want = (crypto.join_hmac(self.kernel_key, self.script_key, self._nonce(flow),
                                         flow.remote_nonce)[:20] if hmac == "auto"
                        else self.join_mac(hmac, self._nonce(flow), flow.remote_nonce, full=True))
                same("sender_hmac", want.hex(), bytes(live.sender_hmac).hex())
            return diffs
        if n == "add_address":
            same("echo flag", int(f["echo"]), live.echo)
            if not live.echo:
                self.advertised[str(live.address)] = live.address_id
            if f.get("address_id") is not None:
                same("address_id", f["address_id"], live.address_id)
            name, func = f["addr"]
            port = live.getfieldval("port")
            if func is not None:
                self.addrs.setdefault(name, Endpoint(_ip(func[1]), port or flow.local.port))
            if name not in self.addrs:
                self.addrs[name] = Endpoint(str(live.address), port or flow.local.port)
            same(f"address {name}", self.addrs[name].ip, str(live.address))
            if f.get("port") is not None:
                same("port", f["port"], port)
            elif strict and port is not None:
                diffs.append(f"add_address: expected no port, got {port}")
            hmac_got = live.getfieldval("truncated_hmac")
            if not f["echo"]:
                want = f.get("hmac", "auto")
                if want == "auto":
                    want = crypto.add_addr_hmac(self.kernel_key, self.script_key, live.address_id,
                                                ipaddress.ip_address(str(live.address)).packed, port)
                same("hmac", want, hmac_got)
            elif hmac_got is not None:
                diffs.append("add_address: an echo carries no HMAC, got one")
            return diffs
        if n == "remove_address":
            same("address ids", f["ids"], list(live.address_ids))
            return diffs
        if n == "mp_prio":
            same("backup", f["backup"], live.backup)
            if "address_id" in f:
                same("address_id", f["address_id"], live.getfieldval("address_id"))
            return diffs
        if n == "mp_fail":
            same("dsn (relative to the script's IDSN)", f["dsn"], (live.dsn - self.script_idsn()) & M64)
            return diffs
        if n == "mp_fastclose":
            same("receiver key", self._fastclose_key(f, self.script_key), live.receiver_key)
            return diffs
        if n == "mp_reset":
            same("reason", f["reason"], live.reason)
            same("transient flag", bool(f["transient"]), bool(int(live.flags) & 0x1))
            return diffs
        raise ScriptError(f"option {n} cannot be checked")


def _ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ScriptError(f"not an IP address: {text!r}") from None


def _show(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) and v > 0xFFFF else repr(v) if isinstance(v, str) else str(v)


def render(live: MPTCPOption, state: State) -> str:
    """A kernel's MPTCP option in the dialect, numbers relative where the script's would be."""
    name = type(live).__name__
    try:
        if isinstance(live, MPCapable):
            keys = [f"{v:#x}" for v in (live.getfieldval("sender_key"), live.getfieldval("receiver_key"))
                    if v is not None]
            s = f"mpcapable v{live.version} flags {int(live.flags):#x} " + (f"key[{', '.join(keys)}]" if keys
                                                                            else "nokey")
            dll = live.getfieldval("data_level_length")
            return s + (f" mpcdatalen {dll}" if dll is not None else "")
        if isinstance(live, DSS):
            lf, parts = int(live.flags), ["dss"]
            if lf & 0x01:
                rel = (live.data_ack - state.script_idsn()) & (M64 if lf & 0x02 else M32) \
                    if state.script_key is not None else live.data_ack
                parts.append(f"dack{8 if lf & 0x02 else 4}={rel}")
            if lf & 0x04:
                rel = (live.dsn - state.kernel_idsn()) & (M64 if lf & 0x08 else M32) \
                    if state.kernel_key is not None else live.dsn
                parts += [f"dsn{8 if lf & 0x08 else 4}={rel}", f"ssn={live.ssn}", f"dll={live.data_level_length}"]
                cs = live.getfieldval("checksum")
                parts.append("nocs" if cs is None else f"cksum={cs}")
            if lf & 0x10:
                parts.append("fin")
            return " ".join(parts)
        if isinstance(live, AddAddr):
            port = live.getfieldval("port")
            hm = live.getfieldval("truncated_hmac")
            return (f"add_address address_id={live.address_id} addr[{live.address}]"
                    + (f" port={port}" if port is not None else "")
                    + (" addr_echo" if live.echo else f" hmac={hm:#x}" if hm is not None else ""))
        if isinstance(live, MPJoinSyn):
            return (f"mp_join_syn backup={live.backup} address_id={live.address_id} "
                    f"token={live.receiver_token:#x} rand={live.sender_random}")
        if isinstance(live, MPJoinSynAck):
            return (f"mp_join_syn_ack backup={live.backup} address_id={live.address_id} "
                    f"sender_hmac={live.sender_truncated_hmac:#x} rand={live.sender_random}")
        if isinstance(live, MPJoinAck):
            return f"mp_join_ack sender_hmac={bytes(live.sender_hmac).hex()}"
        if isinstance(live, RemoveAddr):
            return f"remove_address address_id=[{', '.join(map(str, live.address_ids))}]"
        if isinstance(live, MPPrio):
            aid = live.getfieldval("address_id")
            return f"mp_prio backup={live.backup}" + (f" address_id={aid}" if aid is not None else "")
        if isinstance(live, MPFail):
            return f"mp_fail dsn8={live.dsn:#x}"
        if isinstance(live, MPFastclose):
            return f"mp_fastclose {live.receiver_key:#x}"
        if isinstance(live, MPTCPRst):
            return f"mp_reset {live.reason}" + (" flags[flag_t]" if int(live.flags) & 1 else "")
    except ScriptError:
        pass
    return f"{name} {bytes(live).hex()}"
