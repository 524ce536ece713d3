"""Synthetic long-range tasks for ``attn-bench task``, generated offline from a seed.

Each generator returns a :class:`TaskData`: input ids ``(S, N)``, labels ``(S, N)`` with
:data:`IGNORE` where no loss applies, and how the model reads it (``causal``: a decoder that
predicts at every marked position; otherwise an encoder that classifies the whole sequence from
its first position, whose label is the only one set).

- **ListOps** (Nangia & Bowman 2018, as generated for the Long Range Arena, Tay et al. 2020):
  nested expressions of ``MIN``, ``MAX``, ``MED`` (median, rounded down) and ``SM`` (sum mod 10)
  over the digits 0-9, with bounded depth and number of arguments; an expression is drawn
  top-down (a digit with probability 0.75 at each node below the depth bound), kept only if its
  token length lies in ``(min_len, max_len)``, and duplicates are dropped. 10 classes.
- **MQAR** (multi-query associative recall, Arora et al. 2023, Zoology): ``pairs`` key-value
  pairs, then filler with the keys queried again at random later positions; the label at a
  query is the value bound to that key in this sequence. Causal.
- **Local max**: random tokens ``0..vocab-1``; the label at position ``t`` is the largest token
  of the last ``width`` positions (``t-width+1..t``) modulo 10. Causal. Only a neighbourhood
  matters, so a sliding window no smaller than ``width`` sees all it needs.
- **Long majority** (:func:`long_majority`): ``evidence`` (odd) pairs ``<mark> yes|no`` at
  uniformly random even positions over the whole document, ``yes``/``no`` distractors and filler
  words elsewhere; the label is the majority answer of the marked pairs. Evidence lies everywhere,
  so a prefix of the document leaves the label undetermined (:func:`prefix_bayes_accuracy`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100
"""Label of positions without a loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``)."""

TASKS: tuple[str, ...] = ("listops", "mqar", "local_max", "long_majority")

CAUSAL: dict[str, bool] = {"listops": False, "mqar": True, "local_max": True, "long_majority": False}
"""Whether a task's model is a causal decoder (True) or an encoder (``TaskData.causal``)."""

# -- ListOps --------------------------------------------------------------------------------------

LISTOPS_OPS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
LISTOPS_PAD = "<pad>"
LISTOPS_CLS = "<cls>"
LISTOPS_VOCAB: tuple[str, ...] = (LISTOPS_PAD, LISTOPS_CLS, *(str(d) for d in range(10)), *LISTOPS_OPS, LISTOPS_END)
LISTOPS_IDS: dict[str, int] = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
VALUE_P = 0.25  # LRA: a node below the depth bound is an operator with probability 0.25


@dataclass(frozen=True)
class TaskData:
    """Inputs ``(S, N)`` (int64), labels ``(S, N)`` (IGNORE where no loss), vocab and class counts."""

    inputs: Tensor
    labels: Tensor
    vocab_size: int
    num_classes: int
    causal: bool


class _TooLong(Exception):
    pass


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[str], cap: int) -> None:
    """Append the tokens of one random expression (LRA's top-down rule) to ``out``; raise
    :class:`_TooLong` once it has ``cap`` tokens (it would be filtered out anyway)."""
    if len(out) >= cap:
        raise _TooLong
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        out.append(str(rng.randrange(10)))
        return
    out.append(rng.choice(LISTOPS_OPS))
    for _ in range(rng.randint(2, max_args)):
        _listops_tree(rng, depth + 1, max_depth, max_args, out, cap)
    out.append(LISTOPS_END)


def listops_apply(op: str, args: list[int]) -> int:
    """Value of operator ``op`` on ``args``: MIN, MAX, MED (median, rounded down) or SM (sum mod 10)."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    if op == "[MED":
        s = sorted(args)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    raise ValueError(f"unknown ListOps operator {op!r}")


def listops_eval(tokens: list[str]) -> int:
    """Value of an expression given as tokens (a stack machine; raises on a malformed one)."""
    stack: list[list] = []
    value = None
    for tok in tokens:
        if tok in LISTOPS_OPS:
            stack.append([tok])
        elif tok == LISTOPS_END:
            op, *args = stack.pop()
            value = listops_apply(op, args)
            if stack:
                stack[-1].append(value)
        else:
            value = int(tok)
            if stack:
                stack[-1].append(value)
    if stack or value is None:
        raise ValueError("malformed ListOps expression")
    return value


def listops_expressions(
    count: int, seed: int, *, max_depth: int, max_args: int, min_len: int, max_len: int, max_tries: int = 10**7
) -> list[list[str]]:
    """``count`` distinct expressions whose token length ``L`` has ``min_len < L < max_len``."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for _ in range(max_tries):
        if len(out) == count:
            return out
        toks: list[str] = []
        try:
            _listops_tree(rng, 1, max_depth, max_args, toks, max_len)
        except _TooLong:
            continue
        key = tuple(toks)
        if min_len < len(toks) < max_len and key not in seen:
            seen.add(key)
            out.append(toks)
    raise RuntimeError(f"only {len(out)} of {count} ListOps expressions in ({min_len}, {max_len}) tokens found")


def listops(
    count: int,
    seq_len: int,
    seed: int,
    *,
    max_depth: int = 10,
    max_args: int = 10,
    min_len: int | None = None,
) -> TaskData:
    """ListOps encoder task: ``<cls>`` then the expression, padded to ``seq_len``; label at position 0."""
    min_len = seq_len // 2 if min_len is None else min_len
    exprs = listops_expressions(count, seed, max_depth=max_depth, max_args=max_args, min_len=min_len, max_len=seq_len)
    inputs = torch.full((count, seq_len), LISTOPS_IDS[LISTOPS_PAD], dtype=torch.long)
    labels = torch.full((count, seq_len), IGNORE, dtype=torch.long)
    for i, toks in enumerate(exprs):
        ids = [LISTOPS_IDS[LISTOPS_CLS], *(LISTOPS_IDS[t] for t in toks)]
        inputs[i, : len(ids)] = torch.tensor(ids)
        labels[i, 0] = listops_eval(toks)
    return TaskData(inputs, labels, len(LISTOPS_VOCAB), 10, causal=False)


def listops_tokens(row: Tensor) -> list[str]:
    """The expression tokens of one encoded row (``<cls>`` and padding dropped)."""
    return [LISTOPS_VOCAB[int(i)] for i in row if LISTOPS_VOCAB[int(i)] not in (LISTOPS_PAD, LISTOPS_CLS)]


# -- MQAR -----------------------------------------------------------------------------------------


def mqar(count: int, seq_len: int, seed: int, *, pairs: int = 16, num_keys: int = 64, num_values: int = 64) -> TaskData:
    """Multi-query associative recall.

    Token ids: keys ``0..num_keys-1``, values ``num_keys..num_keys+num_values-1``, then one filler.
    Positions ``0..2*pairs-1`` hold ``k1 v1 ... kP vP`` (distinct keys); every key is queried once
    at a random position in ``[2*pairs, seq_len)`` (other positions hold the filler). The label at
    a query is the index ``0..num_values-1`` of its value; other positions are IGNORE."""
    if pairs > num_keys:
        raise ValueError(f"pairs ({pairs}) must be at most num_keys ({num_keys})")
    if 3 * pairs > seq_len:
        raise ValueError(f"seq_len ({seq_len}) must hold {pairs} pairs and {pairs} queries")
    g = torch.Generator().manual_seed(seed)
    filler = num_keys + num_values
    inputs = torch.full((count, seq_len), filler, dtype=torch.long)
    labels = torch.full((count, seq_len), IGNORE, dtype=torch.long)
    tail = seq_len - 2 * pairs
    for i in range(count):
        keys = torch.randperm(num_keys, generator=g)[:pairs]
        vals = torch.randint(num_values, (pairs,), generator=g)
        inputs[i, 0 : 2 * pairs : 2] = keys
        inputs[i, 1 : 2 * pairs : 2] = vals + num_keys
        where = 2 * pairs + torch.randperm(tail, generator=g)[:pairs]
        inputs[i, where] = keys
        labels[i, where] = vals
    return TaskData(inputs, labels, num_keys + num_values + 1, num_values, causal=True)


# -- local max ------------------------------------------------------------------------------------


def local_max(count: int, seq_len: int, seed: int, *, width: int = 8, vocab: int = 100) -> TaskData:
    """Label at ``t``: ``max(x[max(0, t-width+1) .. t]) % 10``; every position is labelled."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(vocab, (count, seq_len), generator=g)
    padded = torch.nn.functional.pad(inputs, (width - 1, 0), value=-1)
    labels = padded.unfold(1, width, 1).amax(-1) % 10
    return TaskData(inputs, labels, vocab, 10, causal=True)


# -- long majority --------------------------------------------------------------------------------

LONG_PAD, LONG_MARK, LONG_NO, LONG_YES = 0, 1, 2, 3
LONG_FILLER0 = 4  # filler words are LONG_FILLER0 .. LONG_FILLER0 + filler - 1


def long_majority(
    count: int, seq_len: int, seed: int, *, evidence: int = 7, filler: int = 16, distractor_pct: int = 20
) -> TaskData:
    """Majority vote of evidence spread over the whole document (an encoder task, 2 classes).

    Token ids: 0 padding (unused), 1 ``<mark>``, 2 ``no``, 3 ``yes``, then ``filler`` filler words.
    ``evidence`` (odd) distinct pair slots ``(2s, 2s+1)`` are drawn uniformly from all
    ``seq_len // 2``; each holds ``<mark>`` then an answer drawn fairly. Every other position is a
    ``yes``/``no`` distractor (not after a mark) with probability ``distractor_pct`` %, else a
    filler word. Label at position 0: 1 if most marked answers are ``yes``, else 0."""
    if evidence < 1 or evidence % 2 == 0:
        raise ValueError(f"evidence must be odd and positive, got {evidence}")
    if 2 * evidence > seq_len:
        raise ValueError(f"seq_len ({seq_len}) must hold {evidence} evidence pairs")
    g = torch.Generator().manual_seed(seed)
    inputs = LONG_FILLER0 + torch.randint(filler, (count, seq_len), generator=g)
    distract = torch.rand(count, seq_len, generator=g) < distractor_pct / 100
    inputs[distract] = LONG_NO + torch.randint(2, (int(distract.sum()),), generator=g)
    slots = torch.rand(count, seq_len // 2, generator=g).argsort(-1)[:, :evidence]
    answers = torch.randint(2, (count, evidence), generator=g)
    inputs.scatter_(1, 2 * slots, LONG_MARK)
    inputs.scatter_(1, 2 * slots + 1, LONG_NO + answers)
    labels = torch.full((count, seq_len), IGNORE, dtype=torch.long)
    labels[:, 0] = (answers.sum(-1) * 2 > evidence).long()
    return TaskData(inputs, labels, LONG_FILLER0 + filler, 2, causal=False)


def long_evidence(inputs: Tensor) -> Tensor:
    """Marked answers ``(S, N)``: +1 yes, -1 no, 0 elsewhere (the token after each ``<mark>``)."""
    after_mark = torch.zeros_like(inputs, dtype=torch.bool)
    after_mark[:, 1:] = inputs[:, :-1] == LONG_MARK
    return after_mark * ((inputs == LONG_YES).long() - (inputs == LONG_NO).long())


def prefix_bayes_accuracy(inputs: Tensor, prefix: int, evidence: int) -> float:
    """Accuracy of the best classifier that sees only ``inputs[:, :prefix]`` (a Bayes bound).

    The answers of the evidence beyond the prefix are fair coins independent of the prefix, so
    given ``y`` yes and ``n`` no in view, P(label = yes) = P(y + Bin(evidence - y - n, 1/2) >
    evidence / 2); the best guess is right with probability max(p, 1 - p). Mean over rows."""
    ev = long_evidence(inputs[:, :prefix])
    yes, no = (ev == 1).sum(-1).tolist(), (ev == -1).sum(-1).tolist()
    total = 0.0
    for y, n in zip(yes, no, strict=True):
        hidden = evidence - y - n
        need = evidence // 2 + 1 - y  # yes among the hidden ones for a yes majority
        p = sum(math.comb(hidden, k) for k in range(max(0, need), hidden + 1)) / 2**hidden
        total += max(p, 1 - p)
    return total / max(1, len(yes))


def make_task(task: str, count: int, seq_len: int, seed: int, **params: int) -> TaskData:
    """Generate ``count`` examples of ``task`` (one of :data:`TASKS`) with its parameters."""
    if task == "listops":
        return listops(count, seq_len, seed, **params)
    if task == "mqar":
        return mqar(count, seq_len, seed, **params)
    if task == "local_max":
        return local_max(count, seq_len, seed, **params)
    if task == "long_majority":
        return long_majority(count, seq_len, seed, **params)
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
