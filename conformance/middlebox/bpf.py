"""Classic BPF programs for `iptables -m bpf`: TCP payload-length tests that no plain xt match
expresses (`-m length` sees the whole IP packet, whose header and TCP option lengths vary).

A program sees the packet from its network header on and matches when it returns non-zero. The
few instructions used here are assembled to the `--bytecode "N,code jt jf k,..."` text, and an
interpreter for the same instructions lets the unit tests run a program on scapy-built packets.

IPv6: TCP is expected right after the fixed header (next header 6, as in every topology here);
a packet with extension headers never matches."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

# Opcodes (linux/bpf_common.h, linux/filter.h): class | size | mode, or class | op | source.
LDB_ABS, LDH_ABS, LDB_IND = 0x30, 0x28, 0x50
LDXB_MSH = 0xB1  # X = 4 * (pkt[k] & 0x0f): the IPv4 header length
ALU_RSH_K, ALU_LSH_K, ALU_ADD_X, ALU_SUB_X = 0x74, 0x64, 0x0C, 0x1C
JEQ_K, JGT_K = 0x15, 0x25
RET_K, TAX = 0x06, 0x07

TESTS: dict[str, Callable[[int, int], bool]] = {"eq": operator.eq, "gt": operator.gt}
_JUMPS = {"eq": JEQ_K, "gt": JGT_K}


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0


def payload_length(family: int, test: str, value: int) -> list[Insn]:
    """A program matching TCP segments whose payload length `test`s ("eq" or "gt") `value`."""
    if test not in TESTS:
        raise ValueError(f"test {test!r} not one of {', '.join(TESTS)}")
    if family == 4:
        header = [
            Insn(LDXB_MSH, k=0),  # X = IP header length
            Insn(LDB_IND, k=12),  # A = TCP byte 12 (data offset << 4)
            Insn(ALU_RSH_K, k=4),
            Insn(ALU_LSH_K, k=2),  # A = TCP header length
            Insn(ALU_ADD_X),  # A = IP + TCP header lengths
            Insn(TAX),
            Insn(LDH_ABS, k=2),  # A = IP total length
            Insn(ALU_SUB_X),  # A = payload length
        ]
    elif family == 6:
        header = [
            Insn(LDB_ABS, k=6),  # next header
            Insn(JEQ_K, jt=0, jf=8, k=6),  # not TCP right after the fixed header: no match
            Insn(LDB_ABS, k=40 + 12),
            Insn(ALU_RSH_K, k=4),
            Insn(ALU_LSH_K, k=2),  # A = TCP header length
            Insn(TAX),
            Insn(LDH_ABS, k=4),  # A = payload length field (TCP header + data)
            Insn(ALU_SUB_X),  # A = TCP payload length
        ]
    else:
        raise ValueError(f"family {family!r} not one of 4, 6")
    return [*header, Insn(_JUMPS[test], jt=0, jf=1, k=value), Insn(RET_K, k=1), Insn(RET_K, k=0)]


def bytecode(program: list[Insn]) -> str:
    """The `iptables -m bpf --bytecode` text of `program`."""
    return ",".join([str(len(program))] + [f"{i.code} {i.jt} {i.jf} {i.k}" for i in program])


class BpfFault(Exception):
    """The program read outside the packet (the kernel then returns 0: no match)."""


def execute(program: list[Insn], packet: bytes) -> int:
    """Run `program` on `packet` (from its network header) the way the kernel does, for the
    instructions `payload_length` uses. A read past the end returns 0, as in the kernel."""
    a = x = pc = 0

    def load(offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(packet):
            raise BpfFault(offset)
        return int.from_bytes(packet[offset:offset + size], "big")

    try:
        while True:
            insn = program[pc]
            pc += 1
            c, k = insn.code, insn.k
            if c == LDB_ABS:
                a = load(k, 1)
            elif c == LDH_ABS:
                a = load(k, 2)
            elif c == LDB_IND:
                a = load(x + k, 1)
            elif c == LDXB_MSH:
                x = 4 * (load(k, 1) & 0x0F)
            elif c == ALU_RSH_K:
                a = (a >> k) & 0xFFFFFFFF
            elif c == ALU_LSH_K:
                a = (a << k) & 0xFFFFFFFF
            elif c == ALU_ADD_X:
                a = (a + x) & 0xFFFFFFFF
            elif c == ALU_SUB_X:
                a = (a - x) & 0xFFFFFFFF
            elif c == TAX:
                x = a
            elif c in (JEQ_K, JGT_K):
                hit = a == k if c == JEQ_K else a > k
                pc += insn.jt if hit else insn.jf
            elif c == RET_K:
                return k
            else:
                raise ValueError(f"opcode {c:#x} not supported by this interpreter")
    except BpfFault:
        return 0


def parse(text: str) -> list[Insn]:
    """The program of a `--bytecode` text (the inverse of `bytecode`)."""
    count, *insns = text.split(",")
    program = [Insn(*(int(v) for v in insn.split())) for insn in insns]
    if int(count) != len(program):
        raise ValueError(f"bytecode announces {count} instructions, has {len(program)}")
    return program


__all__ = ["BpfFault", "Insn", "bytecode", "execute", "parse", "payload_length"]
