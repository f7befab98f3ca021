"""tshark as a second oracle: our codec and tshark must agree on every MPTCP option of a capture.

A disagreement is reported as such (which frame, which field, both values), never resolved in
favour of either side: one of the two decoders is wrong, and a human has to look.

How. tshark decodes the capture once (`tshark_frames`: fields mode, `-T fields -e`, every MPTCP
option field this tshark has, see `tshark_fields`). From our own decode of each option (class name
and field values, as conformance.wire.bulk and our scapy classes give them) `tshark_view` computes
what tshark should show, in tshark's notation: every field and every flag bit. tshark's `-e` mode
flattens fields: a field that occurs in several options of one segment comes back as one list, in
option order. So per field the concatenation of the views over the segment's options is compared
with tshark's list; a field only one option carries is thereby compared option by option, and
several options of one subtype in a segment are compared in order. A field tshark shows that no
view predicts is a disagreement too (a newer tshark with a field we do not model says so).

Where tshark does not show a field at all (TSHARK_BLIND, e.g. the DSS checksum in tshark 4.0) the
value is counted as unseen, not compared; the kernel's cryptography is the oracle there (see
tests/test_wire_oracles.py). tshark's token and IDSN of an MP_CAPABLE key (mptcp.expected_token,
mptcp.expected_idsn) are compared with conformance.wire.crypto's. A segment with a malformed option
(MPTCPMalformed: tshark shows whatever it got to before giving up) has its option lengths compared
only; its options count as `unchecked`."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Protocol

from conformance.errors import CommandError, InputError
from conformance.observe import segments as ours
from conformance.proc import run
from conformance.wire import crypto
from conformance.wire.options import SUBTYPES

P = "tcp.options.mptcp."
TOKEN, IDSN, RM_COUNT = "mptcp.expected_token", "mptcp.expected_idsn", "mptcp.rm_addr.count"
EXTRA_FIELDS = (RM_COUNT, TOKEN, IDSN)
CRYPTO_FIELDS = (TOKEN, IDSN)  # tshark's own SHA-256 of a key: compared with crypto.token()/idsn()
# Fields our model knows tshark leaves out, and why: (our class name, tshark field) -> reason.
TSHARK_BLIND = {
    ("DSS", P + "checksum"): "tshark 4.0 never shows a DSS checksum: packet-tcp.c adds it only when "
                             "optlen >= offset - start_offset + 4, i.e. 2 bytes more than the option has",
}
_FRAME_FIELDS = ("frame.number", "tcp.option_kind", "tcp.option_len")
AGGREGATOR = ","  # no MPTCP field value (numbers, hex, addresses, hex bytes) contains it


class OptionLike(Protocol):
    """One MPTCP option as our codec decoded it (conformance.observe.segments.Option)."""

    cls: str
    fields: Mapping
    raw: bytes


# -- tshark ---------------------------------------------------------------------------------------
@cache
def tshark_fields() -> tuple[str, ...]:
    """Every MPTCP option field this tshark has (`tshark -G fields`), plus the derived ones we check."""
    try:
        out = run(["tshark", "-G", "fields"], timeout=60).stdout
    except CommandError as exc:
        raise InputError(f"tshark cannot list its fields ({exc.stderr.strip()[:200]})") from None
    names = [cols[2] for line in out.splitlines() if len(cols := line.split("\t")) > 2
             and cols[0] == "F" and cols[2].startswith(P)]
    return (*sorted(names), *EXTRA_FIELDS)


def capture_key(pcap: Path | str) -> tuple[str, float]:
    """(path, modification time) of a capture: the key tshark results are cached under."""
    path = Path(pcap)
    try:
        return str(path), path.stat().st_mtime
    except OSError:
        raise InputError(f"{pcap}: no such capture file") from None


def tshark_rows(pcap: str, fields: Sequence[str], prefs: Sequence[str] = (), *, timeout: float = 300,
                doing: str = "read") -> list[list[str]]:
    """One row per TCP segment of `pcap`: the values of `fields` in tshark's fields mode, a field
    that occurs several times in the segment joined by AGGREGATOR, absent ones empty."""
    argv = ["tshark", "-n", "-r", pcap, "-Y", "tcp", "-T", "fields", "-E", "occurrence=a",
            "-E", f"aggregator={AGGREGATOR}", "-E", "separator=/t", "-E", "header=n"]
    for pref in prefs:
        argv += ["-o", pref]
    for name in fields:
        argv += ["-e", name]
    try:
        out = run(argv, timeout=timeout).stdout
    except CommandError as exc:
        raise InputError(f"{pcap}: tshark cannot {doing} this capture ({exc.stderr.strip()[:200]})") from None
    return [cols for line in out.splitlines() if (cols := line.split("\t"))[0]]


def tshark_frames(pcap: Path | str) -> dict[int, dict[str, list[str]]]:
    """frame number -> {field: values in dissection order} for every TCP segment of `pcap`, as
    `tshark -T json -e` would give them (only the fields present; tcp.option_kind and
    tcp.option_len included). Fields mode (`-T fields`) gives the same values, faster.
    Cached per file and modification time: treat the result as read-only."""
    return _tshark_frames(*capture_key(pcap))


@lru_cache(maxsize=32)
def _tshark_frames(pcap: str, mtime: float) -> dict[int, dict[str, list[str]]]:
    names = (*_FRAME_FIELDS, *tshark_fields())
    return {int(cols[0]): {name: value.split(AGGREGATOR) for name, value in zip(names, cols, strict=False)
                           if value}
            for cols in tshark_rows(pcap, names, ("mptcp.analyze_mptcp:TRUE",))}


def mptcp_lengths(layers: Mapping[str, list[str]]) -> list[str | None]:
    """tshark's tcp.option_len of each kind-30 option of one frame, in order."""
    lengths = iter(layers.get("tcp.option_len", ()))
    out = []
    for kind in layers.get("tcp.option_kind", ()):
        length = None if kind in ("0", "1") else next(lengths, None)  # EOL and NOP carry no length
        if kind == "30":
            out.append(length)
    return out


# -- what tshark should show for one option ------------------------------------------------------
# Each view function fills {full tshark field name: [values in tshark's -e notation]} from our
# field values; a field our codec left out (None or absent) is not shown.
_View = dict[str, list[str]]


def _bit(value: int, mask: int) -> list[str]:
    return ["1" if value & mask else "0"]


def _hex(value: int, width: int) -> list[str]:
    return [f"0x{value:0{width}x}"]


def _optional(f: Mapping, v: _View, pairs: tuple[tuple[str, str], ...]) -> None:
    """Our field -> tshark field (shown as a decimal number), for fields a form may lack."""
    for ours_name, name in pairs:
        value = f.get(ours_name)
        if value is not None:
            v[name] = [str(value)]


_MPC_OPTIONAL = (("sender_key", P + "sendkey"), ("receiver_key", P + "recvkey"),
                 ("data_level_length", P + "datalvllen"))


def _mp_capable(f: Mapping, v: _View) -> None:
    flags, version = f["flags"], f["version"]
    v[P + "version"] = [str(version)]
    v[P + "flags"] = _hex(flags, 2)
    v[P + "checksumreq.flags"] = _bit(flags, 0x80)
    v[P + "extensibility.flag"] = _bit(flags, 0x40)
    if version == 0:  # RFC 6824: no C flag, S (SHA-1) is bit H, D..G plus C reserved
        v[P + "sha1.flag"] = _bit(flags, 0x01)
        v[P + "reserved.flag"] = _hex((flags >> 1) & 0x1F, 2)
    else:
        v[P + "nomoresubflows.flag"] = _bit(flags, 0x20)
        v[P + "sha256.flag"] = _bit(flags, 0x01)
        v[P + "reserved.flag"] = _hex((flags >> 1) & 0x0F, 2)
    _optional(f, v, _MPC_OPTIONAL)
    checksum = f.get("checksum")
    if checksum is not None:
        v[P + "checksum"] = _hex(checksum, 4)
    key = f.get("sender_key")
    if key is not None and version == 1 and flags & 0x01:
        v[TOKEN] = [str(crypto.token(key))]
        v[IDSN] = [str(crypto.idsn(key))]


def _mp_join(f: Mapping, v: _View) -> None:  # SYN and SYN/ACK
    v[P + "flags"] = _hex(0x10 | f["reserved"] << 1 | f["backup"], 2)  # tshark: the whole subtype byte
    v[P + "backup.flag"] = [str(f["backup"])]
    v[P + "addrid"] = [str(f["address_id"])]
    if "receiver_token" in f:
        v[P + "recvtok"] = [str(f["receiver_token"])]
    else:
        v[P + "sendtrunchmac"] = [str(f["sender_truncated_hmac"])]
    v[P + "sendrand"] = [str(f["sender_random"])]


def _mp_join_ack(f: Mapping, v: _View) -> None:
    v[P + "reserved"] = _hex(f["reserved"], 4)
    v[P + "sendhmac"] = [bytes(f["sender_hmac"]).hex()]


_DSS_BITS = tuple((P + f"{name}.flag", mask) for name, mask in (
    ("datafin", 0x10), ("dseqn8", 0x08), ("dseqnpresent", 0x04), ("dataack8", 0x02), ("dataackpresent", 0x01)))
_DSS_OPTIONAL = (("data_ack", P + "rawdataack"), ("dsn", P + "rawdataseqno"), ("ssn", P + "subflowseqno"),
                 ("data_level_length", P + "datalvllen"))


def _dss(f: Mapping, v: _View) -> None:
    flags = f["flags"]
    v[P + "flags"] = _hex((f["reserved"] & 0x7) << 5 | flags, 2)  # tshark: the whole flags byte
    for name, mask in _DSS_BITS:
        v[name] = ["1" if flags & mask else "0"]
    _optional(f, v, _DSS_OPTIONAL)
    checksum = f.get("checksum")
    if checksum is not None:
        v[P + "checksum"] = _hex(checksum, 4)


_ADD_ADDR_OPTIONAL = (("port", P + "port"), ("truncated_hmac", P + "addaddrtrunchmac"))


def _add_addr(f: Mapping, v: _View) -> None:
    address = f["address"]
    v[P + "echo"] = [str(f["echo"])]
    v[P + "addrid"] = [str(f["address_id"])]
    v[P + ("ipv6" if ":" in address else "ipv4")] = [address]
    _optional(f, v, _ADD_ADDR_OPTIONAL)


def _remove_addr(f: Mapping, v: _View) -> None:
    v[P + "addrid"] = [str(i) for i in f["address_ids"]]
    v[RM_COUNT] = [str(len(f["address_ids"]))]


def _mp_prio(f: Mapping, v: _View) -> None:
    v[P + "flags"] = _hex(0x50 | f["reserved"] << 1 | f["backup"], 2)
    v[P + "backup.flag"] = [str(f["backup"])]
    _optional(f, v, (("address_id", P + "addrid"),))


def _mp_fail(f: Mapping, v: _View) -> None:
    v[P + "reserved"] = _hex(f["reserved"], 4)
    v[P + "rawdataseqno"] = [str(f["dsn"])]


def _mp_fastclose(f: Mapping, v: _View) -> None:
    v[P + "reserved"] = _hex(f["reserved"], 4)
    v[P + "recvkey"] = [str(f["receiver_key"])]


_RST_BITS = tuple((P + f"flag_{name}.flag", mask) for name, mask in (("U", 0x8), ("V", 0x4), ("W", 0x2),
                                                                      ("T", 0x1)))


def _mp_tcprst(f: Mapping, v: _View) -> None:
    flags = f["flags"]
    v[P + "flags"] = _hex(0x80 | flags, 2)
    for name, mask in _RST_BITS:
        v[name] = ["1" if flags & mask else "0"]
    v[P + "rst_reason"] = _hex(f["reason"], 2)


def _subtype_only(f: Mapping, v: _View) -> None:
    """MP_EXPERIMENTAL and unassigned subtypes: tshark shows the subtype and nothing else."""


_VIEWS: dict[str, Callable[[Mapping, _View], None]] = {
    "MPCapable": _mp_capable, "MPJoinSyn": _mp_join, "MPJoinSynAck": _mp_join, "MPJoinAck": _mp_join_ack,
    "DSS": _dss, "AddAddr": _add_addr, "RemoveAddr": _remove_addr, "MPPrio": _mp_prio, "MPFail": _mp_fail,
    "MPFastclose": _mp_fastclose, "MPTCPRst": _mp_tcprst, "MPExperimental": _subtype_only,
    "MPTCPUnknown": _subtype_only,
}
_SUBTYPE = P + "subtype"


def tshark_view(cls: str, fields: Mapping) -> dict[str, list[str]] | None:
    """The fields (full tshark names) and values (tshark's -e notation) tshark should show for one
    option our codec decoded as class `cls` with `fields` (conformance.wire.bulk.decode_option's
    values, which are our scapy classes' ones: see option_of). None for a malformed option: what
    tshark shows of one is not predictable field by field."""
    view_of = _VIEWS.get(cls)
    if view_of is None:
        if cls == "MPTCPMalformed":
            return None
        raise ValueError(f"no tshark view for MPTCP option class {cls!r}")
    v: _View = {_SUBTYPE: [str(fields["subtype"])]}
    view_of(fields, v)
    return v


def option_of(opt) -> ours.Option:
    """A scapy MPTCPOption (conformance.wire.options) as the Option our bulk decoder gives."""
    from conformance.wire.bulk import scapy_fields

    return ours.Option(type(opt).__name__, scapy_fields(opt), bytes(opt))


def subtype_name(opt: OptionLike) -> str:
    """The RFC name of an option's subtype (MP_CAPABLE, MP_JOIN, ...); unassigned ones with their number."""
    if opt.cls == "MPTCPUnknown":
        return f"unknown subtype {opt.fields.get('subtype')}"
    if opt.cls == "MPTCPMalformed":
        return "malformed"
    return _RFC_NAMES.get(opt.cls, opt.cls)


_RFC_NAMES = {"MPCapable": SUBTYPES[0], "MPJoinSyn": SUBTYPES[1], "MPJoinSynAck": SUBTYPES[1],
              "MPJoinAck": SUBTYPES[1], "DSS": SUBTYPES[2], "AddAddr": SUBTYPES[3], "RemoveAddr": SUBTYPES[4],
              "MPPrio": SUBTYPES[5], "MPFail": SUBTYPES[6], "MPFastclose": SUBTYPES[7], "MPTCPRst": SUBTYPES[8],
              "MPExperimental": SUBTYPES[15]}


# -- comparison ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Disagreement:
    pcap: str
    frame: int
    what: str  # "field tcp.options.mptcp.rawdataack", "MPTCP option lengths", ...
    ours: object
    theirs: object
    field: str | None = None  # the tshark field, when one field disagrees
    options: str = ""  # our options involved: "#1 DSS 1e0c2001...", in segment order

    def __str__(self) -> str:
        return (f"{Path(self.pcap).name} frame {self.frame}: {self.what}: "
                f"our codec {self.ours!r}, tshark {self.theirs!r}"
                + (f" (option {self.options})" if self.options else ""))


@dataclass
class Agreement:
    """What a comparison found. Mergeable: `a.add(b)` sums the counts of several captures."""

    options: int = 0  # MPTCP options both decoded and compared
    fields: int = 0  # field values compared (the option's length counts as one)
    per_subtype: Counter = field(default_factory=Counter)  # subtype -> options compared
    disagreements: list[Disagreement] = field(default_factory=list)  # the first `most` of them
    disagreed: int = 0  # every disagreement, also those past `most`
    pcaps: int = 0
    frames: int = 0  # TCP segments both decoded
    per_subtype_agreed: Counter = field(default_factory=Counter)  # subtype -> options whose fields all agree
    per_field: Counter = field(default_factory=Counter)  # "subtype field" -> values that agreed
    forms: Counter = field(default_factory=Counter)  # "subtype/length" -> options
    blind: Counter = field(default_factory=Counter)  # "subtype field" -> values tshark does not show
    crypto: Counter = field(default_factory=Counter)  # "subtype field" -> tshark token/IDSN equal to ours
    unchecked: int = 0  # options of segments with a malformed option: only their lengths compared

    def add(self, other: Agreement) -> Agreement:
        self.options += other.options
        self.fields += other.fields
        self.disagreements += other.disagreements
        self.disagreed += other.disagreed
        self.pcaps += other.pcaps
        self.frames += other.frames
        self.unchecked += other.unchecked
        for mine, theirs in ((self.per_subtype, other.per_subtype), (self.per_subtype_agreed,
                             other.per_subtype_agreed), (self.per_field, other.per_field),
                             (self.forms, other.forms), (self.blind, other.blind), (self.crypto, other.crypto)):
            mine.update(theirs)
        return self

    def summary(self) -> dict:
        return {"pcaps": self.pcaps, "frames": self.frames, "options": self.options, "fields": self.fields,
                "per_subtype": {s: {"options": n, "all_fields_agree": self.per_subtype_agreed[s]}
                                for s, n in sorted(self.per_subtype.items())},
                "per_field": dict(sorted(self.per_field.items())), "forms": dict(sorted(self.forms.items())),
                "tshark_blind": dict(self.blind), "tshark_crypto_agree": dict(self.crypto),
                "unchecked": self.unchecked, "disagreements": self.disagreed}

    def failure(self, what: str, shown: int = 25) -> str:
        """A message listing the first `shown` disagreements."""
        lines = "\n  ".join(str(d) for d in self.disagreements[:shown])
        more = self.disagreed - min(shown, len(self.disagreements))
        return (f"{what}: {self.disagreed} disagreement(s) between our codec and tshark:\n  {lines}"
                + (f"\n  ... and {more} more" if more > 0 else ""))


def _describe(opts: Sequence[OptionLike], who: Iterable[int]) -> str:
    return ", ".join(f"#{i + 1} {subtype_name(opts[i])} {opts[i].raw.hex()}" for i in who)


# (subtype name, length, view fields, values per field) -> options agreeing exactly so; counted
# into an Agreement's per-field counters once per pcap instead of once per option.
_Shapes = Counter


def compare_frames(pcap: Path | str, mine: Mapping[int, Sequence[OptionLike]],
                   theirs: Mapping[int, Mapping[str, list[str]]], *, most: int = 20) -> Agreement:
    """Compare the MPTCP options of every TCP segment, our decode (frame -> options, e.g. the
    Option lists of conformance.observe.segments) against tshark's (frame -> fields, as
    tshark_frames gives them), field by field."""
    result = Agreement(pcaps=1)
    name = str(pcap)
    shapes: _Shapes = Counter()

    def differ(frame: int, what: str, a: object, b: object, field: str | None = None, options: str = "") -> None:
        result.disagreed += 1
        if len(result.disagreements) < most:
            result.disagreements.append(Disagreement(name, frame, what, a, b, field, options))

    for frame in sorted(mine.keys() | theirs.keys()):
        opts, layers = mine.get(frame), theirs.get(frame)
        if opts is None or layers is None:
            if opts or (layers is not None and mptcp_lengths(layers)):
                differ(frame, "TCP segment with MPTCP options", "decoded" if opts is not None else "not decoded",
                       "decoded" if layers is not None else "not decoded",
                       options=_describe(opts, range(len(opts))) if opts else "")
            continue
        result.frames += 1
        if opts or _SUBTYPE in layers or "30" in layers.get("tcp.option_kind", _NONE):
            _compare_frame(frame, opts, layers, result, shapes, differ)
    for (sub, length, names, sizes), n in shapes.items():
        result.options += n
        result.fields += n
        result.per_subtype[sub] += n
        result.per_subtype_agreed[sub] += n
        result.forms[f"{sub}/{length}"] += n
        result.per_field[f"{sub} length"] += n
        for fname, size in zip(names, sizes, strict=True):
            result.fields += n * size
            counter = result.crypto if fname in CRYPTO_FIELDS else result.per_field
            counter[_label(sub, fname)] += n * size
    return result


_NONE: list[str] = []
_LABELS: dict[tuple[str, str], str] = {}


def _label(sub: str, fname: str) -> str:
    """"DSS rawdataack": a field of a subtype, as the per-field counters name it."""
    label = _LABELS.get((sub, fname))
    if label is None:
        label = _LABELS[(sub, fname)] = f"{sub} {fname.removeprefix(P)}"
    return label


def _compare_frame(frame: int, opts: Sequence[OptionLike], layers: Mapping[str, list[str]], result: Agreement,
                   shapes: _Shapes, differ: Callable[..., None]) -> None:
    lengths = [str(o.raw[1]) if len(o.raw) > 1 else None for o in opts]
    theirs_lengths = mptcp_lengths(layers)
    if lengths != theirs_lengths:
        differ(frame, "MPTCP option lengths (tcp.option_len of kind 30)", lengths, theirs_lengths,
               "tcp.option_len", _describe(opts, range(len(opts))))
        return
    names = [subtype_name(o) for o in opts]
    views = [tshark_view(o.cls, o.fields) for o in opts]
    if None in views:  # a malformed option: tshark's flattened fields cannot be attributed
        for sub, length in zip(names, lengths, strict=True):
            result.options += 1
            result.fields += 1
            result.unchecked += 1
            result.per_subtype[sub] += 1
            result.forms[f"{sub}/{length}"] += 1
        return
    shown = {k: v for k, v in layers.items() if k.startswith(P) or k in EXTRA_FIELDS}
    if len(views) == 1 and views[0] == shown:  # the usual case: one option, every field agrees
        view = views[0]
        shapes[(names[0], lengths[0], tuple(view), tuple(map(len, view.values())))] += 1
        return
    ok = [True] * len(opts)
    done: set[str] = set()
    for view in views:
        for fname in view:
            if fname in done:
                continue
            done.add(fname)
            who = [i for i, v in enumerate(views) if fname in v]
            full = [x for i in who for x in views[i][fname]]
            theirs = shown.get(fname, _NONE)
            unseen: list[int] = []
            if theirs != full:
                blind = [i for i in who if (opts[i].cls, fname) in TSHARK_BLIND]
                sighted = [x for i in who if i not in blind for x in views[i][fname]]
                if not blind or theirs != sighted:
                    differ(frame, f"field {fname}", full, theirs, fname, _describe(opts, who))
                    result.fields += len(full)
                    for i in who:
                        ok[i] = False
                    continue
                unseen = blind
            for i in who:
                n = len(views[i][fname])
                if i in unseen:
                    result.blind[_label(names[i], fname)] += n
                    continue
                result.fields += n
                (result.crypto if fname in CRYPTO_FIELDS else result.per_field)[_label(names[i], fname)] += n
    for fname, values in shown.items():
        if fname in done or fname in CRYPTO_FIELDS:
            continue  # a token or IDSN no view predicts: a key hashed with an algorithm we do not model
        differ(frame, f"field {fname}", [], values, fname, _describe(opts, range(len(opts))))
        ok = [False] * len(opts)
    for sub, length, good in zip(names, lengths, ok, strict=True):
        result.options += 1
        result.fields += 1
        result.per_subtype[sub] += 1
        result.forms[f"{sub}/{length}"] += 1
        if good:
            result.per_subtype_agreed[sub] += 1
            result.per_field[f"{sub} length"] += 1


def compare(pcap: Path | str, *, most: int = 20) -> Agreement:
    """Compare every MPTCP option of `pcap` between our codec and tshark, field by field; keep the
    first `most` disagreements (Agreement.disagreed counts them all)."""
    path = Path(pcap)
    if not path.is_file():
        raise InputError(f"{path}: no such capture file")
    # tshark runs in another process while this one decodes.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(tshark_frames, path)
        mine = {s.frame: s.options for s in ours.decode(path)}
        return compare_frames(path, mine, theirs.result(), most=most)
