"""Text data: tokenizers, the token cache (built once, never half-used) and the window sampler."""
import json

import numpy as np
import pytest

from tritonforge.engine.config import DataConfig, RecipeError
from tritonforge.engine.data import text
from tritonforge.engine.data.text import ByteTokenizer, TokenWindows, load_tokens


def _docs(tmp_path, n=40):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"document {i}: " + "abc " * (i % 7 + 3)}) for i in range(n)))
    return f


def _cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), val_fraction=0.2, **kw)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    s = "héllo, wörld ✓\n"
    ids = tok.encode(s)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert tok.decode(ids) == s


def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, _docs(tmp_path))
    first = load_tokens(cfg, log=lambda *_: None)
    assert len(first.train) > 0 and len(first.val) > 0
    calls = []
    monkeypatch.setattr(text, "iter_documents", lambda c: calls.append(c) or iter(()))
    again = load_tokens(cfg, log=lambda *_: None)
    assert calls == [] and again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.train), np.asarray(first.train))


def test_split_is_fixed_by_content(tmp_path):
    cfg = _cfg(tmp_path, _docs(tmp_path))
    data = load_tokens(cfg, log=lambda *_: None)
    val_text = ByteTokenizer().decode(data.val)
    train_text = ByteTokenizer().decode(data.train)
    for i in range(40):
        doc = f"document {i}: " + "abc " * (i % 7 + 3)
        assert (doc in val_text) != (doc in train_text)  # each document in exactly one split
        assert (doc in val_text) == text._is_val(doc, 0.2)


@pytest.mark.parametrize("damage", ["no_meta", "short_file"])
def test_half_written_cache_is_never_used(tmp_path, damage):
    cfg = _cfg(tmp_path, _docs(tmp_path))
    good = load_tokens(cfg, log=lambda *_: None)
    expected = np.asarray(good.train).copy()
    if damage == "no_meta":
        (good.path / "meta.json").unlink()
    else:
        with open(good.path / "train.bin", "r+b") as f:
            f.truncate(10)
    del good
    rebuilt = load_tokens(cfg, log=lambda *_: None)
    np.testing.assert_array_equal(np.asarray(rebuilt.train), expected)


def test_one_large_document_still_gets_a_validation_split(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "SPLIT_PIECE_CHARS", 100)
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} of one long book\n" for i in range(2000)))
    data = load_tokens(_cfg(tmp_path, f), log=lambda *_: None)
    assert 0.1 < len(data.val) / (len(data.train) + len(data.val)) < 0.3


def test_changed_source_gets_a_new_cache(tmp_path):
    src = _docs(tmp_path)
    cfg = _cfg(tmp_path, src)
    a = load_tokens(cfg, log=lambda *_: None)
    src.write_text(json.dumps({"text": "something else entirely " * 20}) + "\n")
    b = load_tokens(cfg, log=lambda *_: None)
    assert a.path != b.path


def test_local_text_file_and_errors(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("plain text file\n" * 50)
    data = load_tokens(_cfg(tmp_path, f), log=lambda *_: None)
    assert len(data.train) + len(data.val) == len("plain text file\n" * 50) + 2  # + the document separator
    with pytest.raises(RecipeError, match="data.source: path does not exist"):
        load_tokens(_cfg(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(RecipeError, match="data.text_field: column 'body' not found"):
        load_tokens(_cfg(tmp_path, _docs(tmp_path), text_field="body"))


def test_stdlib_corpus_is_present():
    fp = text.source_fingerprint(DataConfig())
    assert len(fp["files"]) > 100
    assert sum(size for _, size, _ in fp["files"]) > 5_000_000


def test_windows_are_a_pure_function_of_the_step():
    tokens = np.arange(1000, dtype=np.uint16)
    w = TokenWindows(tokens, seq_len=8, batch_size=3, grad_accum=2, seed=7)
    x1, y1 = w.batch(5, 1)
    x2, y2 = TokenWindows(tokens, 8, 3, 2, seed=7).batch(5, 1)
    assert x1.shape == (3, 8) and (x1 == x2).all() and (y1 == x1 + 1).all()
    assert not (w.batch(6, 1)[0] == x1).all()


def test_ranks_slice_the_same_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    single = TokenWindows(tokens, 8, batch_size=4, grad_accum=2, seed=1, world=1)
    pair = TokenWindows(tokens, 8, batch_size=2, grad_accum=2, seed=1, world=2)
    for micro in range(2):
        whole = single.batch(3, micro)[0]
        parts = [pair.batch(3, micro, rank)[0] for rank in range(2)]
        # Same set of windows per step, split without overlap between ranks.
        everything = {tuple(r.tolist()) for m in range(2) for r in single.batch(3, m)[0]}
        assert all(tuple(r.tolist()) in everything for p in parts for r in p)
    assert whole.shape == (4, 8)
    a, b = (pair.batch(3, 0, rank)[0] for rank in range(2))
    assert not any((ra == rb).all() for ra in a for rb in b)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(RecipeError, match="train.seq_len \\(64\\) needs at least 65 tokens; the data has 10"):
        TokenWindows(np.arange(10, dtype=np.uint16), 64, 1, 1, 0)


def test_one_text_file_gets_a_validation_split_of_val_fraction(tmp_path):
    """A single .txt file is one document: 100 contiguous chunks, 5 of them (val_fraction 0.05) held out by hash."""
    f = tmp_path / "notes.txt"
    body = "".join(f"note {i}: {'xyz ' * (i % 5)}\n" for i in range(600))
    f.write_text(body)
    cfg = DataConfig(source=str(f), cache_dir=str(tmp_path / "cache"), val_fraction=0.05)
    data = load_tokens(cfg, log=lambda *_: None)
    total = len(body) + 2  # + the document separator
    assert len(data.train) + len(data.val) == total
    assert abs(len(data.val) - 0.05 * total) <= 5  # 5 chunks of total / 100 tokens, rounded per chunk
    # Contiguous chunks of the text: each held-out run of tokens is a piece of the file, and the training
    # tokens are the rest of it, in order.
    val_text = ByteTokenizer().decode(data.val)
    assert val_text not in body  # not one tail: 5 separate chunks
    again = load_tokens(DataConfig(source=str(f), cache_dir=str(tmp_path / "other"), val_fraction=0.05),
                        log=lambda *_: None)
    np.testing.assert_array_equal(np.asarray(again.val), np.asarray(data.val))


def test_split_one_document_keeps_chunks_whole_and_in_order():
    ids = np.arange(1000, dtype=np.uint16)
    train, val, train_segments, val_segments = text._split_one_document(ids, 0.05, 2)
    assert len(val) == 50 and len(train) == 950
    assert sorted(np.concatenate([train, val]).tolist()) == ids.tolist()
    starts = [int(c) for c in val[::10]]  # 5 chunks of 10 consecutive ids, in order
    assert all(s % 10 == 0 for s in starts) and starts == sorted(starts)
    assert (np.diff(val.reshape(5, 10), axis=1) == 1).all()
    # Segments: the runs of contiguous chunks; the run holding the last chunk ends in the separator.
    for tokens, segs in ((train, train_segments), (val, val_segments)):
        starts = [s for s, _ in segs]
        assert starts[0] == 0 and starts == sorted(starts)
        gaps = [i for i in range(1, len(tokens)) if int(tokens[i]) != int(tokens[i - 1]) + 1]
        assert starts[1:] == gaps
    assert [sep for _, sep in train_segments + val_segments].count(2) == 1
    assert (train_segments if train[-1] == 999 else val_segments)[-1][1] == 2
    assert len(text._split_one_document(ids, 0.001, 2)[1]) == 1  # 1000 chunks of one id: one held out
    assert len(text._split_one_document(ids, 0.0, 2)[1]) == 0


def test_evaluation_windows_are_fixed_spread_and_tiling():
    tokens = np.arange(1001, dtype=np.uint16)
    w = TokenWindows(tokens, seq_len=10, batch_size=4, grad_accum=1, seed=0)
    spread = w.spread_starts(6)
    assert spread.tolist() == [0, 198, 396, 594, 792, 990]  # first to last window, evenly
    np.testing.assert_array_equal(spread, w.spread_starts(6))
    tiling = w.tiling_starts()
    assert tiling.tolist() == list(range(0, 991, 10))  # 100 windows, the last ends on the last token
    batches = list(w.eval_batches(tiling[:10]))
    assert [c for _, _, c in batches] == [4, 4, 2] and all(x.shape == (4, 10) for x, _, _ in batches)
    assert (batches[0][1] == batches[0][0] + 1).all()


def test_evaluation_windows_split_over_ranks_once_each():
    """Two ranks see every window exactly once and run the same number of batches (padding does not count)."""
    tokens = np.arange(500, dtype=np.uint16)
    starts = np.arange(0, 490, 10)[:7]
    shares = []
    for rank in range(2):
        w = TokenWindows(tokens, 10, batch_size=2, grad_accum=1, seed=0, world=2)
        shares.append([(x, c) for x, _, c in w.eval_batches(starts, rank)])
    assert len(shares[0]) == len(shares[1]) == 2
    counted = sorted(int(x[i, 0]) for share in shares for x, c in share for i in range(c))
    assert counted == starts.tolist()
