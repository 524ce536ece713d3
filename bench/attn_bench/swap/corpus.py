"""A byte-level language-modelling corpus that every machine has offline: the Python standard
library's own ``.py`` sources (code, comments and docstrings), as shipped with the interpreter.

Files under ``test``/``tests``/``idle_test`` folders and ``site-packages`` are left out. The split
is by file: a file is held out when the first byte of the SHA-256 of its relative path is below
:data:`HELDOUT_BYTE` (about 10% of the files, the same files on every machine that has them).
:func:`manifest` records the file lists and one SHA-256 over every (path, content) pair, so two
runs are comparable exactly when their digests agree (the stdlib differs between Python versions).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_bench.task.tasks import TaskData

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
HELDOUT_BYTE = 26  # of 256: about 10% of the files are held out
VOCAB = 256  # bytes


@dataclass(frozen=True)
class Corpus:
    """The concatenated bytes of the training files and of the held-out files."""

    root: str
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train: bytes
    heldout: bytes
    sha256: str  # over (relative path, NUL, content, NUL) of every file, in sorted order


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    return hashlib.sha256(relpath.encode()).digest()[0] < HELDOUT_BYTE


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> Corpus:
    """Read the corpus under ``root`` (default: this interpreter's standard library)."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"no standard library sources at {base}")
    paths = sorted(
        (p.relative_to(base).as_posix(), p)
        for p in base.rglob("*.py")
        if p.is_file() and not set(p.relative_to(base).parts[:-1]) & SKIP_DIRS
    )
    digest = hashlib.sha256()
    train, heldout, train_files, heldout_files = [], [], [], []
    for rel, p in paths:
        data = p.read_bytes()
        digest.update(rel.encode() + b"\0" + data + b"\0")
        (heldout if is_heldout(rel) else train).append(data)
        (heldout_files if is_heldout(rel) else train_files).append(rel)
    if not train or not heldout:
        raise ValueError(f"{base} has too few .py files for a train/held-out split ({len(paths)} found)")
    return Corpus(
        str(base), tuple(train_files), tuple(heldout_files), b"".join(train), b"".join(heldout), digest.hexdigest()
    )


def manifest(corpus: Corpus) -> dict:
    """What identifies the corpus, for ``metadata.json``: digest, sizes, Python version, file lists."""
    return {
        "source": "the Python standard library's .py files (tests and site-packages left out)",
        "python": sys.version.split()[0],
        "sha256": corpus.sha256,
        "train_bytes": len(corpus.train),
        "heldout_bytes": len(corpus.heldout),
        "train_files": list(corpus.train_files),
        "heldout_files": list(corpus.heldout_files),
    }


def _as_task(windows: torch.Tensor) -> TaskData:
    """Windows ``(S, N + 1)`` of bytes as next-byte prediction: inputs ``[:-1]``, labels ``[1:]``."""
    return TaskData(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), VOCAB, VOCAB, causal=True)


def lm_data(corpus: Corpus, seq_len: int, train_size: int, test_size: int, seed: int) -> tuple[TaskData, TaskData]:
    """``train_size`` training windows of ``seq_len + 1`` bytes at offsets drawn from ``seed``, and
    ``test_size`` held-out windows at evenly spaced offsets (the same for every seed)."""
    for name, v in (("seq_len", seq_len), ("train_size", train_size), ("test_size", test_size)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    span = seq_len + 1
    if len(corpus.heldout) < span * test_size or len(corpus.train) < 2 * span:
        raise ValueError(f"the corpus is too small for {test_size} held-out windows of {span} bytes")
    train = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8)
    heldout = torch.frombuffer(bytearray(corpus.heldout), dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(train) - span, (train_size,), generator=g)
    tr = train[starts.unsqueeze(1) + torch.arange(span)].long()
    offsets = torch.linspace(0, len(heldout) - span, test_size).long()
    te = heldout[offsets.unsqueeze(1) + torch.arange(span)].long()
    return _as_task(tr), _as_task(te)
