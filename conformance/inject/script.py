"""Scripts for the scripted peer: a list of steps, each a small dict, validated before anything runs.

A step is `{"op": ..., ...}`:

Every step but sleep takes `subflow` (default 0): which of the peer's paths it acts on.

  syn      send a SYN; `options`: MPTCP options (below), `wait` seconds for the SYN/ACK (default 2)
  join     an MP_JOIN handshake on a new subflow: SYN with the server's token (or `token`),
           `address_id`, `backup`; the SYN/ACK's HMAC is checked; the third ACK carries our HMAC,
           `hmac: "bad"` a corrupted one, `"none"` no MP_JOIN
  ack      send a pure ACK acknowledging what arrived; `options`
  data     send `size` bytes of payload; `options`, or `mapping: "auto"` for a DSS mapping (and
           Data ACK) from the tracked data sequence state (`dsn_bits` 64 or 32; `checksum` "auto"
           as negotiated, "always", "never" or "bad": a wrong one), `skip: N` first leaves N bytes
           of the data sequence space unsent (a hole), `mapping: "mpc"` for MP_CAPABLE with
           both keys and the data-level length (§3.1, data on the third ACK / first data),
           `mapping: "infinite"` for an infinite mapping (DSS with data-level length 0 from this
           segment on: the fallback of §3.7); no mapping and no options: plain TCP data
  fin      send a TCP FIN (no MPTCP option unless `options`): closing a plain TCP connection
  data_fin send a DATA_FIN (DSS with F, SSN 0, length 1) with a TCP FIN if `tcp_fin` (default true)
  recv     wait up to `timeout` seconds (default 2) for `until`: "any" (one segment), "fin", "rst",
           "data:N" (N payload bytes), "quiet" (no segment for `timeout`); received data is ACKed
           (with a DSS Data ACK once MPTCP is established) unless `ack: false`
  resend   send the last segment sent again, unchanged (a retransmission)
  rst      send a RST; `options`
  sleep    wait `seconds`

An MPTCP option is `{"Class": {field: value}}` with a class of conformance.wire (MPCapable, DSS,
MPJoinSyn, AddAddr, MPFastclose, ...); a value may name the tracked state: "$client_key",
"$server_key", "$server_token", "$client_idsn", "$server_idsn", "$data_ack" (the server's next
DSN), "$dsn" (ours), and in an AddAddr, "$hmac" (its truncated HMAC from our key, the server's, and
its own ID, address and port). `seq_offset` on ack and rst moves that one segment's sequence number
(an out-of-window signal, RFC 5961)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from conformance.errors import InputError
from conformance.wire import options as wire_options

OPS = {
    "syn": {"options", "wait", "mss", "subflow"},
    "join": {"subflow", "address_id", "backup", "token", "hmac", "wait"},
    "ack": {"options", "seq_offset", "subflow"},
    "data": {"size", "options", "mapping", "push", "subflow", "dsn_bits", "checksum", "skip"},
    "data_fin": {"options", "tcp_fin", "subflow"},
    "fin": {"options", "subflow"},
    "recv": {"timeout", "until", "ack", "subflow"},
    "rst": {"options", "seq_offset", "subflow"},
    "resend": {"subflow"},
    "sleep": {"seconds"},
}
VARIABLES = {"$client_key", "$server_key", "$server_token", "$client_idsn", "$server_idsn", "$data_ack", "$dsn",
             "$hmac"}
UNTIL = ("any", "fin", "rst", "quiet")


def option_classes() -> dict[str, type]:
    base = wire_options.MPTCPOption
    return {name: cls for name, cls in vars(wire_options).items()
            if isinstance(cls, type) and issubclass(cls, base) and cls is not base}


def validate(steps: object, source: str = "script") -> list[dict]:
    """The steps, or InputError naming the step and field that is wrong."""
    if not isinstance(steps, Sequence) or isinstance(steps, str | bytes) or not steps:
        raise InputError(f"{source}: expected a non-empty list of steps")
    classes = option_classes()
    out = []
    for i, step in enumerate(steps):
        where = f"{source}: step {i + 1}"
        if not isinstance(step, Mapping) or "op" not in step:
            raise InputError(f"{where}: expected a mapping with an 'op'")
        op = step["op"]
        if op not in OPS:
            raise InputError(f"{where}: unknown op {op!r} (known: {', '.join(OPS)})")
        extra = set(step) - OPS[op] - {"op"}
        if extra:
            raise InputError(f"{where} ({op}): unknown field(s) {', '.join(sorted(extra))}")
        for n, opt in enumerate(step.get("options", [])):
            if not isinstance(opt, Mapping) or len(opt) != 1:
                raise InputError(f"{where} ({op}): option {n + 1}: expected {{Class: {{field: value}}}}")
            (name, fields), = opt.items()
            cls = classes.get(name)
            if cls is None:
                raise InputError(f"{where} ({op}): option {n + 1}: unknown option class {name!r}")
            known = {f.name for f in cls.fields_desc}
            if not isinstance(fields, Mapping) or set(fields) - known:
                bad = sorted(set(fields) - known) if isinstance(fields, Mapping) else fields
                raise InputError(f"{where} ({op}): option {n + 1} ({name}): unknown field(s) {bad}")
            for k, v in fields.items():
                if isinstance(v, str) and v.startswith("$") and v not in VARIABLES:
                    raise InputError(f"{where} ({op}): option {n + 1} ({name}).{k}: unknown variable {v}")
        if "subflow" in step and (not isinstance(step["subflow"], int) or isinstance(step["subflow"], bool)
                                  or not 0 <= step["subflow"] < 8):
            raise InputError(f"{where} ({op}): subflow must be a path index from 0 to 7")
        if op == "join" and step.get("hmac", "good") not in ("good", "bad", "none"):
            raise InputError(f"{where} (join): hmac must be 'good', 'bad' or 'none'")
        if op == "data" and (not isinstance(step.get("size"), int) or step["size"] <= 0):
            raise InputError(f"{where} (data): size must be a positive number of bytes")
        if op == "data" and step.get("mapping") not in (None, "auto", "mpc", "infinite"):
            raise InputError(f"{where} (data): mapping must be 'auto', 'mpc' or 'infinite'")
        if op == "data" and step.get("dsn_bits", 64) not in (32, 64):
            raise InputError(f"{where} (data): dsn_bits must be 32 or 64")
        if op == "data" and step.get("checksum", "auto") not in ("auto", "always", "never", "bad"):
            raise InputError(f"{where} (data): checksum must be 'auto', 'always', 'never' or 'bad'")
        if op == "data" and (not isinstance(step.get("skip", 0), int) or step.get("skip", 0) < 0):
            raise InputError(f"{where} (data): skip must be a number of bytes, 0 or more")
        until = step.get("until", "any")
        if op == "recv" and not (until in UNTIL or (isinstance(until, str) and until.startswith("data:")
                                                     and until[5:].isdigit())):
            raise InputError(f"{where} (recv): until must be one of {', '.join(UNTIL)} or data:N")
        for key in ("wait", "timeout", "seconds"):
            if key in step and (not isinstance(step[key], int | float) or isinstance(step[key], bool)
                                or not 0 <= step[key] <= 60):
                raise InputError(f"{where} ({op}): {key} must be a number of seconds between 0 and 60")
        out.append(dict(step))
    return out
