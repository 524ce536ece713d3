"""Reading SASS (``cuobjdump -sass``): instructions, loops, and the main loop's instruction mix.

Plain Python, no Triton needed: :func:`parse` takes the listing text, :func:`loops` finds the loops
(a branch back to an earlier address: the body runs from the target to the branch, both
included), and :func:`main_loop` picks the hottest one and counts what it issues per iteration.

**Which loop is the main loop.** A kernel can have several: the fused softmax kernels walk their
key tiles in a masked edge pass, the unmasked interior pass and another masked edge pass (plus a
pass over global tokens), each a loop of its own. All passes do the same tile work, and the
interior pass is the steady state of a long sequence. So among the innermost loops (those that
contain no other loop) the main loop is one with the most tensor-core instructions (HGMMA + HMMA;
FFMA when no loop has any) and, of those, the one with the fewest instructions: the passes that
mask pay extra instructions for it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# "/*0a70*/   @!P0 BRA 0x1720 ;" -> address, optional predicate, opcode, operands
_SHAPE = re.compile(r"\.(\d+x\d+x\d+)")  # HGMMA.64x32x16.F32.BF16 -> 64x32x16
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: ``address`` (bytes), ``opcode`` with its modifiers (``"HGMMA.64x32x16.F32.BF16"``),
    ``predicate`` (``"@!P0"`` or ``""``) and the ``operands`` text."""

    address: int
    opcode: str
    predicate: str = ""
    operands: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers: ``"HGMMA"``."""
        return self.opcode.split(".", 1)[0]


@dataclass(frozen=True)
class Loop:
    """The instructions from a backward branch's target to the branch (``start``, ``end``: addresses)."""

    start: int
    end: int
    body: tuple[Instruction, ...]

    def contains(self, other: Loop) -> bool:
        return self != other and self.start <= other.start and other.end <= self.end


@dataclass
class LoopStats:
    """What one iteration of a loop issues (counts of SASS instructions, per warp).

    ``instructions`` counts every instruction of the body but NOPs. ``hgmma`` / ``hmma``: Hopper
    warp-group MMAs (wgmma) / warp-level ``mma.sync``; ``hgmma_tf32`` / ``hmma_tf32`` those with TF32 operands;
    ``hgmma_shapes``: ``"64x32x16 x8, 64x128x16 x2"``. Loads: ``utmaldg`` (TMA), ``ldgsts``
    (``cp.async``), ``ldg`` (synchronous global loads). ``bar``: ``BAR`` instructions (CTA barriers).
    """

    start: int
    end: int
    instructions: int
    hgmma: int
    hmma: int
    hgmma_tf32: int
    hmma_tf32: int
    hgmma_shapes: str
    utmaldg: int
    ldgsts: int
    ldg: int
    bar: int
    fmul: int
    ffma: int
    mufu: int
    opcodes: Counter = field(default_factory=Counter)


def parse(text: str) -> list[Instruction]:
    """The instructions of a ``cuobjdump -sass`` listing, in address order (one kernel's listing)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            pred = (m.group(2) or "").strip()
            out.append(Instruction(int(m.group(1), 16), m.group(3), pred, m.group(4).strip()))
    return out


def _branch_target(ins: Instruction) -> int | None:
    if ins.base != "BRA":
        return None
    m = re.search(r"0x([0-9a-fA-F]+)", ins.operands)
    return int(m.group(1), 16) if m else None


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop: for each branch target reached from a later address, the body from the target to
    the last branch back to it. A branch to itself (the trap after ``EXIT``) is not a loop."""
    ends: dict[int, int] = {}
    for ins in instructions:
        target = _branch_target(ins)
        if target is not None and target < ins.address:
            ends[target] = max(ends.get(target, -1), ins.address)
    out = []
    for start, end in sorted(ends.items()):
        body = tuple(i for i in instructions if start <= i.address <= end)
        out.append(Loop(start, end, body))
    return out


def innermost(found: list[Loop]) -> list[Loop]:
    """The loops that contain no other loop."""
    return [a for a in found if not any(a.contains(b) for b in found)]


def loop_stats(loop: Loop) -> LoopStats:
    """Counts of one iteration of ``loop`` (see :class:`LoopStats`)."""
    body = [i for i in loop.body if i.base != "NOP"]
    ops = Counter(i.base for i in body)
    hgmma = [i for i in body if i.base == "HGMMA"]
    shapes = Counter(m.group(1) for i in hgmma if (m := _SHAPE.search(i.opcode)))
    return LoopStats(
        start=loop.start,
        end=loop.end,
        instructions=len(body),
        hgmma=len(hgmma),
        hmma=ops["HMMA"],
        hgmma_tf32=sum(".TF32" in i.opcode for i in hgmma),
        hmma_tf32=sum(".TF32" in i.opcode for i in body if i.base == "HMMA"),
        hgmma_shapes=", ".join(f"{s} x{n}" for s, n in shapes.items()),
        utmaldg=ops["UTMALDG"],
        ldgsts=ops["LDGSTS"],
        ldg=ops["LDG"],
        bar=ops["BAR"],
        fmul=ops["FMUL"],
        ffma=ops["FFMA"],
        mufu=ops["MUFU"],
        opcodes=ops,
    )


@dataclass
class MainLoop:
    """The main loop's counts, and how it was chosen: ``why`` is one line, ``loops`` the number of
    loops in the kernel and ``candidates`` the innermost loops it was chosen among."""

    stats: LoopStats
    why: str
    loops: int
    candidates: int


def main_loop(instructions: list[Instruction]) -> MainLoop | None:
    """The hottest loop (see the module docstring), or None when the kernel has no loop."""
    found = loops(instructions)
    if not found:
        return None
    inner = [loop_stats(loop) for loop in innermost(found)]
    mma = max(s.hgmma + s.hmma for s in inner)
    if mma > 0:
        hot = [s for s in inner if s.hgmma + s.hmma == mma]
        what = f"{mma} HGMMA+HMMA"
    else:
        most = max(s.ffma for s in inner)
        hot = [s for s in inner if s.ffma == most]
        what = f"no MMA; {most} FFMA"
    best = min(hot, key=lambda s: (s.instructions, s.start))
    why = f"innermost loop with the most work ({what}), shortest of {len(hot)} such"
    if len(hot) == 1:
        why = f"innermost loop with the most work ({what})"
    return MainLoop(best, why, len(found), len(inner))
