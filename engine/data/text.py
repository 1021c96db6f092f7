"""Text data: tokenizers, sources, a memory-mapped token cache, and a step-indexed window sampler.

Sources (``data.source``):

- ``stdlib``: the embedded default. The Python standard library's own ``.py`` files (about 12 MB of real
  text, tests excluded) are present on every machine that can run the engine, so the main job needs no
  download.
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a dataset by name, downloaded and cached by ``datasets``.
- a local path: a ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file, or a directory of them, read through
  ``datasets``.

Each source is tokenized once into two flat ``uint16`` token files (train and validation) under
``data.cache_dir``, in a folder keyed by the source's fingerprint and the tokenizer. The folder is built
under a temporary name and renamed into place, so a crash mid-build never leaves a cache that a later run
would use. Documents (pieces of 64 Ki characters for longer ones) go to validation by a hash of their content, so
the split is fixed. A source of one document (a single ``.txt`` file) is cut instead into 100 contiguous
chunks of tokens, and the ``val_fraction`` of them with the smallest hashes are its validation split. Beside
each token file, a segment table records where each run of one document's contiguous text starts and
whether it ends in the document separator: the document boundaries of packed windows (``data.packing``).

The sampler draws training windows as a pure function of (seed, step): resuming needs only the step, and
every rank of a distributed run slices its part of the same global batch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from ..config import DataConfig, RecipeError
from .cache import fsync_file, open_or_build

CACHE_FORMAT = 4
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    name = "byte"
    vocab_size = 256
    #: Documents are joined by a blank line.
    separator = [10, 10]

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2 BPE through ``tiktoken`` (optional: installed by the user, imported only when asked for)."""

    name = "gpt2"
    vocab_size = 50257

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise RecipeError("data.tokenizer = 'gpt2' needs the tiktoken package: pip install tiktoken") from None
        self._enc = tiktoken.get_encoding("gpt2")
        self.separator = [self._enc.eot_token]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint16)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def get_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise RecipeError(f"data.tokenizer: unknown tokenizer {name!r}; valid: byte, gpt2")


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------

def _stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files outside tests and packages, sorted (os.walk: rglob cost each run a second)."""
    root, files = Path(sysconfig.get_paths()["stdlib"]), []
    for folder, subs, names in os.walk(root, followlinks=True):
        subs[:] = [d for d in subs if d not in ("site-packages", "dist-packages", "test", "tests", "idle_test")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _LOCAL_BUILDERS)
    if not files:
        raise RecipeError(f"data.source: no .txt/.jsonl/.json/.parquet files under {path}")
    kinds = {_LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        raise RecipeError(f"data.source: {path} is not a .txt/.jsonl/.json/.parquet file")
    if len(kinds) > 1:
        raise RecipeError(f"data.source: {path} mixes file kinds {sorted(kinds)}; use one kind per source")
    return files


def _fingerprint_files(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def source_fingerprint(cfg: DataConfig) -> dict:
    """What identifies the source's content, cheaply (paths, sizes and modification times)."""
    if cfg.source == "stdlib":
        root, files = _stdlib_files()
        return {"source": "stdlib", "files": _fingerprint_files(files)}
    if cfg.source.startswith("hf:"):
        return {"source": cfg.source, "split": cfg.split, "field": cfg.text_field}
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise RecipeError(f"data.source: path does not exist: {path}")
    return {"source": str(path.resolve()), "files": _fingerprint_files(_local_files(path)),
            "field": cfg.text_field}


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the source's documents as strings."""
    if cfg.source == "stdlib":
        _, files = _stdlib_files()
        for f in files:
            yield f.read_bytes().decode("utf-8", errors="replace")
        return
    try:
        import datasets  # imported only for sources that need it
    except ImportError:
        raise RecipeError(f"data.source = {cfg.source!r} needs the datasets package: pip install datasets") from None
    if not sys.stderr.isatty():  # progress bars redraw with carriage returns: keep them out of log files
        datasets.disable_progress_bars()
    if cfg.source.startswith("hf:"):
        name, _, config = cfg.source[3:].partition(":")
        ds = datasets.load_dataset(name, config or None, split=cfg.split)
    else:
        files = _local_files(Path(cfg.source).expanduser())
        builder = _LOCAL_BUILDERS[files[0].suffix]
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
    if cfg.text_field not in ds.column_names:
        raise RecipeError(f"data.text_field: column {cfg.text_field!r} not found; columns: {ds.column_names}")
    for row in ds:
        text = row[cfg.text_field]
        if text:
            yield text


#: Documents longer than this are split into pieces of this many characters for the train/val split, so that a
#: source made of one large file still gets a validation split.
SPLIT_PIECE_CHARS = 1 << 16


def _pieces(doc: str) -> list[str]:
    return [doc[i:i + SPLIT_PIECE_CHARS] for i in range(0, len(doc), SPLIT_PIECE_CHARS)] or [doc]


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _is_val(doc: str, val_fraction: float) -> bool:
    return (_hash(doc.encode("utf-8", errors="replace")) % 1_000_000) < val_fraction * 1_000_000


#: A one-document source is cut into this many chunks of tokens (more if val_fraction is below 1/100).
ONE_DOCUMENT_CHUNKS = 100


def _split_one_document(ids: np.ndarray, val_fraction: float, sep_len: int):
    """(train, val) tokens of a source that is one document (ending in its ``sep_len`` separator tokens), and
    each split's segments (see :func:`_write_tokens`): contiguous chunks, the ``val_fraction`` of them (at
    least one when val_fraction > 0) with the smallest content hashes held out, each split in order."""
    if val_fraction == 0 or len(ids) < 2:
        return ids, ids[:0], [[0, sep_len]] if len(ids) else [], []
    n = min(len(ids), max(ONE_DOCUMENT_CHUNKS, math.ceil(1 / val_fraction)))
    chunks = np.array_split(ids, n)
    k = min(n - 1, max(1, round(n * val_fraction)))
    val = set(sorted(range(n), key=lambda i: (_hash(chunks[i].tobytes()), i))[:k])
    splits = {False: [], True: []}
    segments = {False: [], True: []}
    for i, chunk in enumerate(chunks):
        held = i in val
        if i == 0 or (i - 1 in val) != held:  # a chunk after a gap starts a new run of contiguous text
            segments[held].append([sum(len(c) for c in splits[held]), 0])
        splits[held].append(chunk)
    segments[(n - 1) in val][-1][1] = sep_len  # the run holding the last chunk ends in the separator
    return (np.concatenate(splits[False]), np.concatenate(splits[True]), segments[False], segments[True])


# ---------------------------------------------------------------------------------------------------
# The token cache
# ---------------------------------------------------------------------------------------------------

@dataclass
class TokenData:
    train: np.ndarray  # uint16 memmap
    val: np.ndarray
    tokenizer: object
    path: Path
    #: Each split's segments, (n, 2) int64: the first token of each run of one document's contiguous text,
    #: and how many separator tokens end it (0 for a piece that the rest of its document does not follow).
    train_segments: np.ndarray | None = None
    val_segments: np.ndarray | None = None


def cache_key(cfg: DataConfig, tokenizer_name: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "tokenizer": tokenizer_name, "val_fraction": cfg.val_fraction,
                       "fingerprint": source_fingerprint(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _slug(source: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in source.rsplit("/", 1)[-1])
    return keep.strip("-")[:40] or "data"


def _open_cache(folder: Path) -> tuple[np.ndarray, ...] | None:
    """The cached (train, val, train segments, val segments), or None if the folder is missing or incomplete."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens, segments = [], []
        for split in ("train", "val"):
            f, g = folder / f"{split}.bin", folder / f"{split}_segments.bin"
            if f.stat().st_size != 2 * meta[f"{split}_tokens"] or g.stat().st_size != 16 * meta[f"{split}_segments"]:
                return None
            tokens.append(np.memmap(f, dtype=np.uint16, mode="r") if meta[f"{split}_tokens"] else
                          np.zeros(0, dtype=np.uint16))
            segments.append(np.fromfile(g, dtype=np.int64).reshape(-1, 2))
        return (*tokens, *segments)
    except (OSError, ValueError, KeyError):
        return None


def _write_tokens(cfg: DataConfig, tokenizer, folder: Path) -> None:
    """Tokenize the source into ``folder`` (empty): train.bin, val.bin, their segment tables, then meta.json.

    A segment is a run of one document's contiguous text in a split: a document whose pieces all fall in
    one split is one segment, ending in the separator; a piece whose previous piece went to the other split
    starts a new one."""
    sep = np.asarray(tokenizer.separator, dtype=np.uint16)
    counts = {"train": 0, "val": 0, "docs_train": 0, "docs_val": 0}
    segments: dict[str, list[list[int]]] = {"train": [], "val": []}
    docs = iter_documents(cfg)
    first, second = next(docs, None), next(docs, None)
    with open(folder / "train.bin", "wb") as ftrain, open(folder / "val.bin", "wb") as fval:
        if first is not None and second is None:  # one document: split by chunks of tokens
            train, val, segments["train"], segments["val"] = _split_one_document(
                np.concatenate([tokenizer.encode(first), sep]), cfg.val_fraction, len(sep))
            ftrain.write(train.tobytes())
            fval.write(val.tobytes())
            counts.update(train=len(train), val=len(val), docs_train=1)
        for doc in itertools.chain([first, second] if second is not None else [], docs):
            pieces = _pieces(doc)
            previous = None
            for i, piece in enumerate(pieces):
                split = "val" if _is_val(piece, cfg.val_fraction) else "train"
                ids = tokenizer.encode(piece)
                if split != previous:
                    segments[split].append([counts[split], 0])
                if i == len(pieces) - 1:
                    ids = np.concatenate([ids, sep])
                    segments[split][-1][1] = len(sep)
                (fval if split == "val" else ftrain).write(ids.tobytes())
                counts[split] += len(ids)
                counts["docs_" + split] += 1
                previous = split
        fsync_file(ftrain)
        fsync_file(fval)
    for split in ("train", "val"):
        with open(folder / f"{split}_segments.bin", "wb") as f:
            f.write(np.asarray(segments[split], dtype=np.int64).reshape(-1, 2).tobytes())
            fsync_file(f)
    meta = {"format": CACHE_FORMAT, "source": cfg.source, "tokenizer": tokenizer.name,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_docs": counts["docs_train"], "val_docs": counts["docs_val"],
            "train_segments": len(segments["train"]), "val_segments": len(segments["val"])}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def load_tokens(cfg: DataConfig, log=print) -> TokenData:
    """Tokenize the source once (cached) and return memory-mapped train/val tokens."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    folder = Path(cfg.cache_dir).expanduser() / f"{_slug(cfg.source)}-{tokenizer.name}-{cache_key(cfg, tokenizer.name)}"
    train, val, train_segments, val_segments = open_or_build(
        folder, _open_cache, lambda tmp: _write_tokens(cfg, tokenizer, tmp),
        announce=lambda: log(f"tokenizing {cfg.source} with the {tokenizer.name} tokenizer into {folder} (once)"))
    return TokenData(train=train, val=val, tokenizer=tokenizer, path=folder, train_segments=train_segments,
                     val_segments=val_segments)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

class Packed(NamedTuple):
    """The inputs of packed windows (``data.packing = "documents"``), each (B, T): the token ids; each token's
    document, numbered from 0 in its window; and its position (from its document's first token in the
    window, or None to keep window positions)."""

    idx: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor | None


#: Targets left out of the loss (the cross-entropy ops' default ``ignore_index``).
IGNORE = -100


class TokenWindows:
    """Random (input, target) windows of ``seq_len`` tokens, a pure function of (seed, step, micro-step).

    At each optimizer step the global batch is ``grad_accum · world · batch_size`` windows drawn from a
    generator seeded by (seed, step); micro-step ``m`` of rank ``r`` takes its own slice. Resuming needs
    only the step; changing the number of processes keeps the global batch the same.

    With ``segments`` (the split's segment table, see :class:`TokenData`) the inputs are :class:`Packed`:
    a window spanning several documents says which token belongs to which, so attention can keep to one
    document; ``separator_loss=False`` sets the targets that are a document's closing separator to
    :data:`IGNORE`.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 world: int = 1, segments: np.ndarray | None = None, reset_positions: bool = True,
                 separator_loss: bool = True):
        if len(tokens) < seq_len + 1:
            raise RecipeError(f"train.seq_len ({seq_len}) needs at least {seq_len + 1} tokens; the data has "
                              f"{len(tokens)}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.grad_accum, self.seed, self.world = grad_accum, seed, world
        self.segments, self.reset_positions, self.separator_loss = segments, reset_positions, separator_loss
        if segments is not None:
            starts = np.asarray(segments[:, 0], dtype=np.int64)
            if len(starts) == 0 or starts[0] != 0 or (np.diff(starts) < 0).any():
                raise RecipeError("data.packing: the token cache's segment table does not cover its tokens; "
                                  f"delete the cache folder to rebuild it")
            self._seg_starts = starts
            self._seg_ends = np.append(starts[1:], len(tokens))
            self._seg_sep = np.asarray(segments[:, 1], dtype=np.int64)

    def _gather(self, starts: np.ndarray):
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        window = torch.from_numpy(self.tokens[idx].astype(np.int64))
        inputs, targets = window[:, :-1], window[:, 1:]
        if self.segments is None:
            return inputs, targets
        seg = np.searchsorted(self._seg_starts, idx, side="right") - 1  # (B, T + 1): each token's segment
        segment_ids = torch.from_numpy((seg[:, :-1] - seg[:, :1]).astype(np.int32))
        positions = None
        if self.reset_positions:  # from the segment's first token, or the window's if it starts before
            first = np.maximum(self._seg_starts[seg[:, :-1]], starts[:, None])
            positions = torch.from_numpy(idx[:, :-1] - first)
        if not self.separator_loss:
            target_seg = seg[:, 1:]
            closing = idx[:, 1:] >= self._seg_ends[target_seg] - self._seg_sep[target_seg]
            targets = targets.masked_fill(torch.from_numpy(closing), IGNORE)
        return Packed(inputs, segment_ids, positions), targets

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        total = self.grad_accum * self.world * self.batch_size
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=total)
        first = (micro * self.world + rank) * self.batch_size
        return self._gather(starts[first:first + self.batch_size])

    def spread_starts(self, n: int) -> np.ndarray:
        """Starts of ``n`` windows spread evenly over the tokens, first to last (the same at every call)."""
        return np.linspace(0, len(self.tokens) - self.seq_len - 1, n).round().astype(np.int64)

    def tiling_starts(self) -> np.ndarray:
        """Starts of the non-overlapping windows that tile the tokens (a tail shorter than a window is left)."""
        return np.arange(0, len(self.tokens) - self.seq_len, self.seq_len, dtype=np.int64)

    def eval_batches(self, starts: np.ndarray, rank: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's share of the windows at ``starts`` as (inputs, targets, windows that count) batches.

        Rank ``r`` takes every ``world``-th window from the ``r``-th. Every rank yields the same number of
        full batches (data-parallel forwards are collective), so a short share ends in repeats of its
        last window, which do not count: only the first ``count`` rows of a batch are real.
        """
        mine = starts[rank::self.world]
        per_rank = -(-len(starts) // self.world)
        for first in range(0, per_rank, self.batch_size):
            chunk = mine[first:first + self.batch_size]
            count = len(chunk)
            pad = self.batch_size - count
            if pad:
                chunk = np.concatenate([chunk, np.full(pad, mine[-1] if len(mine) else starts[0])])
            x, y = self._gather(chunk)
            yield x, y, count


class StreamWindows(TokenWindows):
    """Consecutive windows for each batch row: the sampler of truncated backpropagation through time.

    The training tokens are cut into one contiguous stream per row of the global batch
    (``grad_accum · world · batch_size`` rows, numbered like :class:`TokenWindows`' slices). At step ``s``
    row ``r`` reads window ``s mod n`` of its stream, where ``n`` windows of ``seq_len`` fit in a stream
    after an offset; so a row's window at step ``s + 1`` starts where its window at step ``s`` ended. Every
    ``n`` steps a new pass starts, at an offset in [0, seq_len) drawn from (seed, pass), and the task resets
    the carried state (:meth:`starts_pass`). Everything is a pure function of (seed, step).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 world: int = 1):
        super().__init__(tokens, seq_len, batch_size, grad_accum, seed, world)
        rows = grad_accum * world * batch_size
        self.stream_len = len(tokens) // rows
        self.windows_per_pass = self.stream_len // seq_len - 1  # the offset may take up to one window
        if self.windows_per_pass < 1:
            raise RecipeError(
                f"train.carry_state: {len(tokens)} training tokens cut into {rows} streams (train.batch_size x "
                f"train.grad_accum x processes) leave {self.stream_len} tokens per stream, fewer than "
                f"2 x train.seq_len ({2 * seq_len}); lower train.batch_size or train.seq_len")

    def starts_pass(self, step: int) -> bool:
        """True when ``step`` begins a new pass over the streams (the carried state starts from zero)."""
        return step % self.windows_per_pass == 0

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pass_index, window = divmod(step, self.windows_per_pass)
        offset = int(np.random.default_rng([self.seed, pass_index]).integers(0, self.seq_len))
        first = (micro * self.world + rank) * self.batch_size
        rows = np.arange(first, first + self.batch_size)
        return self._gather(rows * self.stream_len + offset + window * self.seq_len)
