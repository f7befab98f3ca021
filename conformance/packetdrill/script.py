"""packetdrill scripts (the MPTCP fork's dialect) parsed into plain data.

The grammar is declarative (grammar.lark); this module turns its tree into the dataclasses the
engines run, and a malformed script into one `file:line:col: message` ScriptError. The values an
engine needs later (a key learned from the wire, an HMAC) stay symbolic here: a script is data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from conformance.errors import InputError

# A script names what it proves in a header comment: `// requirements: R3.1-01, R3.1-02`.
_REQUIREMENTS = re.compile(r"^\s*//\s*requirements?\s*:\s*(.+)$", re.MULTILINE | re.IGNORECASE)
_RID = re.compile(r"R\d+(?:\.\d+)*-[A-Z]?\d+")
# ... and which engines can run it, with why not the others: `// engines: python (reason)`.
_ENGINES = re.compile(r"^\s*//\s*engines?\s*:\s*([a-z, ]+?)\s*(?:\((.*)\))?\s*$", re.MULTILINE | re.IGNORECASE)


class ScriptError(InputError):
    """A script that cannot be run: `file:line:col: message`."""


@dataclass(frozen=True)
class Where:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Time:
    """When an event happens. `kind`: point, window (start~end), blocking (a syscall that starts at
    `start` and returns at `end`) or any (`*`). Relative values say so in `relative`."""

    kind: str
    start: float = 0.0
    end: float | None = None
    relative: bool = False
    end_relative: bool = False


@dataclass
class Option:
    """One TCP option of a packet line: `name` (mss, nop, TS, mpcapable, dss, add_address, ...) and
    what the script said about its fields; a field the script left out is absent (learned or
    computed when the script runs)."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Packet:
    direction: str  # "<" inbound (the script sends), ">" outbound (the kernel must send)
    flags: str
    seq: int
    end_seq: int
    length: int
    ack: int | None = None
    win: int | None = None
    options: list[Option] | None = None  # None: no option list; [] never happens
    any_options: bool = False  # `<...>`: options not checked
    src: str | None = None  # addr[NAME] variables of the subflow tuple
    dst: str | None = None


@dataclass
class Syscall:
    name: str
    args: list[Any]
    result: Any
    errno: str | None = None
    note: str | None = None


@dataclass
class Command:
    text: str


@dataclass
class Event:
    where: Where
    time: Time | None  # None: a command before the first event (run at start)
    action: Packet | Syscall | Command
    source: str = ""  # the script line, for messages

    @property
    def line(self) -> int:
        return self.where.line


@dataclass
class Script:
    path: Path
    options: dict[str, str]
    events: list[Event]
    requirements: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()  # empty: any engine
    engines_why: str = ""

    @property
    def tolerance(self) -> float:
        return int(self.options.get("tolerance_usecs", 4000)) / 1e6


@dataclass(frozen=True)
class Sym:
    """A symbolic constant of a syscall argument (SOCK_STREAM, O_NONBLOCK, ...)."""

    name: str


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Or:
    terms: tuple[Any, ...]


@dataclass
class Struct:
    """`{fd=3, events=POLLIN}` or `{msg_iov(1)=[...], ...}`: named fields, and positional ones."""

    named: dict[str, Any]
    positional: list[Any]
    index: dict[str, Any] = field(default_factory=dict)


def _int(token: Token) -> int:
    return int(str(token), 0)


def _value(v: Any) -> Any:
    """A dialect value: a number, or a Call (sha256_32(skey), ...) the engine evaluates."""
    return _int(v) if isinstance(v, Token) and v.type == "INT" else v


def _time(token: Token) -> tuple[float, bool]:
    text = str(token)
    return float(text.lstrip("+")), text.startswith("+")


@v_args(inline=True)
class _Build(Transformer):
    def __init__(self, path: str, text: str) -> None:
        super().__init__()
        self.path, self.lines = path, text.splitlines()

    # --- times -----------------------------------------------------------------------------
    def point(self, t):
        start, rel = _time(t)
        return Time("point", start, relative=rel)

    def window(self, a, b):
        (start, rel), (end, end_rel) = _time(a), _time(b)
        return Time("window", start, end, rel, end_rel)

    def blocking(self, a, b):
        (start, rel), (end, _) = _time(a), _time(b)
        # packetdrill adds the start's offset to the end too: `+0...0.020` returns 20 ms in.
        return Time("blocking", start, end, rel, rel)

    def anytime(self):
        return Time("any")

    # --- packets ---------------------------------------------------------------------------
    def inbound(self):
        return "<"

    def outbound(self):
        return ">"

    def addr(self, name):
        return str(name)

    def tuple(self, *addrs):
        return ("tuple", None, addrs[0]) if len(addrs) == 1 else ("tuple", addrs[0], addrs[1])

    def seq(self, a, b, n):
        return ("seq", _int(a), _int(b), _int(n))

    def ack(self, n):
        return ("ack", _int(n))

    def win(self, n):
        return ("win", _int(n))

    def any_options(self):
        return ("options", None)

    def option_list(self, *opts):
        return ("options", list(opts))

    def packet(self, direction, *parts):
        p = Packet(direction, "", 0, 0, 0)
        for part in parts:
            if isinstance(part, Token) and part.type == "FLAGS":
                p.flags = str(part)
            elif part[0] == "tuple":
                p.src, p.dst = part[1], part[2]
            elif part[0] == "seq":
                p.seq, p.end_seq, p.length = part[1:]
                if (p.end_seq - p.seq) & 0xFFFFFFFF != p.length:
                    raise ValueError(f"sequence range {p.seq}:{p.end_seq} does not match its length ({p.length})")
            elif part[0] == "ack":
                p.ack = part[1]
            elif part[0] == "win":
                p.win = part[1]
            elif part[0] == "options":
                p.options, p.any_options = part[1], part[1] is None
        bad = set(p.flags) - set("FSRP.UEWC")
        if bad:
            raise ValueError(f"unknown TCP flag(s) {''.join(sorted(bad))}")
        return p

    # --- TCP options -----------------------------------------------------------------------
    def nop(self):
        return Option("nop")

    def eol(self):
        return Option("eol")

    def mss(self, n):
        return Option("mss", {"value": _int(n)})

    def sack_ok(self):
        return Option("sackOK")

    def sack_block(self, a, b):
        return (_int(a), _int(b))

    def sack(self, *blocks):
        return Option("sack", {"blocks": list(blocks)})

    def timestamp(self, val, ecr):
        return Option("TS", {"val": _int(val), "ecr": _int(ecr)})

    def wscale(self, n):
        return Option("wscale", {"value": _int(n)})

    # --- MPTCP options ---------------------------------------------------------------------
    def flag_names(self, *names):
        bits = 0
        for n in names:
            if str(n) != "no_flags":
                bits |= 0x80 >> (ord(str(n)[-1]) - ord("a"))
        return ("flags", bits)

    def flag_value(self, n):
        return ("flags", _int(n))

    def nokey(self):
        return ("keys", [])

    def keyvar(self, name, value=None):
        return (str(name), None if value is None else _int(value))

    def keys(self, *keyvars):
        return ("keys", list(keyvars))

    def mpcdatalen(self, n):
        return ("datalen", _int(n))

    def mpcapable(self, *parts):
        o = Option("mpcapable", {"version": 1})
        for part in parts:
            if isinstance(part, Token):
                o.fields["version"] = int(str(part)[1])
            else:
                o.fields[part[0]] = part[1]
        return o

    def dss_dack(self, kind, value=None):
        bits = {"dack_bits": 64 if str(kind) == "dack8" else 32}
        return bits if value is None else bits | {"dack": _value(value)}

    def dss_dsn(self, kind, value):
        return {"dsn_bits": 64 if str(kind) == "dsn8" else 32, "dsn": _value(value)}

    def dss_ssn(self, n):
        return {"ssn": _int(n)}

    def dss_dll(self, n):
        return {"dll": _int(n)}

    def dss_nocs(self):
        return {"checksum": None}

    def dss_cksum(self, n):
        return {"checksum": _int(n)}

    def dss_fin(self):
        return {"fin": True}

    def dss(self, *fields):
        o = Option("dss")
        for f in fields:
            o.fields.update(f)
        return o

    def address_id(self, value):
        return ("address_id", None if str(value) == "auto" else _int(value))

    def addr_func(self, func, text):
        return (str(func), str(text)[1:-1])

    def add_addr(self, name, func=None):
        return ("addr", (str(name), func))

    def port(self, n):
        return ("port", _int(n))

    def hmac(self, value):
        return ("hmac", "auto" if str(value) == "auto" else _int(value))

    def addr_echo(self):
        return ("echo", True)

    def add_address(self, *parts):
        o = Option("add_address", {"echo": False})
        for k, v in parts:
            o.fields[k] = v
        if not o.fields["echo"] and "hmac" not in o.fields:
            # packetdrill's grammar: no HMAC given is the echo form (E set, no HMAC).
            o.fields["echo"] = True
        return o

    def remove_address(self, *ids):
        return Option("remove_address", {"ids": [_int(i) for i in ids]})

    def join_backup(self, n):
        return ("backup", _int(n))

    def join_address_id(self, pair):
        return pair

    def join_token(self, value):
        return ("token", "auto" if isinstance(value, Token) and str(value) == "auto" else _value(value))

    def join_rand(self, n):
        return ("rand", _int(n))

    def join_hmac(self, value):
        return ("hmac", "auto" if isinstance(value, Token) and str(value) == "auto" else _value(value))

    def _join(self, name, parts):
        o = Option(name)
        for k, v in parts:
            o.fields[k] = v
        return o

    def mp_join_syn(self, *parts):
        return self._join("mp_join_syn", parts)

    def mp_join_syn_ack(self, *parts):
        return self._join("mp_join_syn_ack", parts)

    def mp_join_ack(self, *parts):
        return self._join("mp_join_ack", parts)

    def backup(self, n):
        return _int(n)

    def mp_prio(self, backup, address_id=None):
        fields = {"backup": backup}
        if address_id is not None and address_id[1] is not None:
            fields["address_id"] = address_id[1]
        return Option("mp_prio", fields)

    def mp_fail(self, n):
        return Option("mp_fail", {"dsn": _int(n)})

    def mp_fastclose(self, keyvar=None):
        return Option("mp_fastclose", {} if keyvar is None else {"key": keyvar})

    def rst_flags(self, *names):
        return any(str(n) == "flag_t" for n in names)

    def mp_reset(self, reason, transient=False):
        return Option("mp_reset", {"reason": _int(reason), "transient": transient})

    def value_args(self, *args):
        return tuple(str(a) if a.type == "NAME" else _int(a) for a in args)

    def call(self, name, args):
        return Call(str(name), args)

    # --- syscalls --------------------------------------------------------------------------
    def number(self, n):
        return _int(n)

    def negative(self, n):
        return -_int(n)

    def symbol(self, name):
        return Sym(str(name))

    def ellipsis(self):
        return Ellipsis

    def string(self, s):
        return str(s)[1:-1]

    def array(self, *items):
        return [i for i in items if i is not None]

    def struct(self, *fields):
        s = Struct({}, [])
        for f in fields:
            if f is None:
                continue
            kind, *rest = f
            if kind == "named":
                s.named[rest[0]] = rest[1]
            elif kind == "indexed":
                s.named[rest[0]] = rest[2]
                s.index[rest[0]] = rest[1]
            else:
                s.positional.append(rest[0])
        return s

    def named(self, name, value):
        return ("named", str(name), value)

    def indexed(self, name, index, value):
        return ("indexed", str(name), index, value)

    def positional(self, value):
        return ("positional", value)

    def call_expr(self, name, *args):
        return Call(str(name), tuple(a for a in args if a is not None))

    def bitor(self, *terms):
        return terms[0] if len(terms) == 1 else Or(terms)

    def syscall(self, name, *rest):
        rest = list(rest)
        note = str(rest.pop())[1:-1] if rest and isinstance(rest[-1], Token) and rest[-1].type == "NOTE" else None
        errno = str(rest.pop()) if rest and isinstance(rest[-1], Token) and rest[-1].type == "ERRNO" else None
        result = rest.pop()
        args = [a for a in rest if a is not None]
        return Syscall(str(name), args, result, errno, note)

    def timed_command(self, text):
        return Command(str(text)[1:-1])


def option_size(o: Option) -> int:
    """Bytes the option takes on the wire as the script writes it (packetdrill's sizes: a DSS
    mapping without `nocs` or `cksum=` has its checksum; an address not yet known counts as IPv4)."""
    f = o.fields
    fixed = {"nop": 1, "eol": 1, "mss": 4, "sackOK": 2, "TS": 10, "wscale": 3, "mp_join_syn": 12,
             "mp_join_syn_ack": 16, "mp_join_ack": 24, "mp_fail": 12, "mp_fastclose": 12, "mp_reset": 4}
    if o.name in fixed:
        return fixed[o.name]
    if o.name == "sack":
        return 2 + 8 * len(f["blocks"])
    if o.name == "mpcapable":
        return {0: 4, 1: 12, 2: 20}[len(f.get("keys", []))] + (2 if "datalen" in f else 0)
    if o.name == "dss":
        n = 4 + ((8 if f["dack_bits"] == 64 else 4) if "dack_bits" in f else 0)
        if "dsn" in f:
            n += (8 if f["dsn_bits"] == 64 else 4) + 6 + (0 if f.get("checksum", 0) is None else 2)
        return n
    if o.name == "add_address":
        func = f["addr"][1]
        v6 = func is not None and func[0] == "inet6_addr"
        return (20 if v6 else 8) + (2 if f.get("port") is not None else 0) + (0 if f["echo"] else 8)
    if o.name == "remove_address":
        return 3 + len(f["ids"])
    if o.name == "mp_prio":
        return 4 if "address_id" in f else 3
    raise ValueError(o.name)


_OPTION = re.compile(r"--([a-z_0-9]+)(?:=(.*))?")


@cache
def _parser() -> Lark:
    return Lark.open("grammar.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def _expected(exc: UnexpectedInput) -> str:
    names = sorted(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or [])
    shown = [n.strip('"').lower() if n.isupper() else n for n in names][:8]
    return f" (expected {', '.join(shown)})" if shown else ""


def parse(text: str, path: str | Path = "<script>") -> Script:
    """The script in `text`, or ScriptError naming `path:line:col` and what is wrong there."""
    where_file = str(path)
    try:
        tree = _parser().parse(text)
    except UnexpectedCharacters as exc:
        raise ScriptError(f"{where_file}:{exc.line}:{exc.column}: unexpected character "
                          f"{text[exc.pos_in_stream]!r}{_expected(exc)}") from None
    except UnexpectedToken as exc:
        got = "end of script" if exc.token.type == "$END" else repr(str(exc.token))
        line, col = (exc.line, exc.column) if exc.line != -1 else (len(text.splitlines()), 1)
        raise ScriptError(f"{where_file}:{line}:{col}: unexpected {got}{_expected(exc)}") from None
    except UnexpectedEOF as exc:
        raise ScriptError(f"{where_file}:{len(text.splitlines())}:1: script ends mid-event"
                          f"{_expected(exc)}") from None
    build = _Build(where_file, text)
    lines = text.splitlines()
    options: dict[str, str] = {}
    events: list[Event] = []
    for node in tree.children:
        where = Where(where_file, node.meta.line, node.meta.column)
        if node.data == "header":
            m = _OPTION.fullmatch(str(node.children[0]))
            options[m.group(1)] = m.group(2) if m.group(2) is not None else "1"
            continue
        try:
            built = build.transform(node)
        except VisitError as exc:
            raise ScriptError(f"{where}: {exc.orig_exc}") from None
        source = lines[node.meta.line - 1].strip() if node.meta.line <= len(lines) else ""
        if node.data == "command":
            events.append(Event(where, None, Command(str(node.children[0])[1:-1]), source))
        else:
            time, action = built.children
            events.append(Event(where, time, action, source))
    for ev in events:
        p = ev.action
        if isinstance(p, Packet) and p.options:
            size = sum(option_size(o) for o in p.options)
            if size % 4:
                raise ScriptError(f"{ev.where}: TCP options are not padded to a multiple of 4 bytes "
                                  f"({size} bytes: add {4 - size % 4} nop)")
            if size > 40:
                raise ScriptError(f"{ev.where}: TCP options take {size} bytes, more than the 40 TCP allows")
    for key in ("tolerance_usecs",):
        if key in options and not options[key].isdigit():
            raise ScriptError(f"{where_file}:1:1: --{key} must be a whole number of microseconds, "
                              f"not {options[key]!r}")
    rids = tuple(r for m in _REQUIREMENTS.finditer(text) for r in _RID.findall(m.group(1)))
    m = _ENGINES.search(text)
    engines = tuple(e.strip().lower() for e in m.group(1).split(",") if e.strip()) if m else ()
    unknown = set(engines) - {"python", "packetdrill"}
    if unknown:
        raise ScriptError(f"{where_file}:1:1: engines: unknown engine(s) {', '.join(sorted(unknown))}")
    return Script(Path(path), options, events, rids, engines, (m.group(2) or "") if m else "")


def load(path: str | Path) -> Script:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{p}:1:1: cannot read the script: {exc}") from None
    return parse(text, p)
