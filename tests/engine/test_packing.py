"""Packed documents: the windows' segment ids, positions and separator targets; a packed GPT computes each
document as if it were alone; packed training agrees between the torch and Triton backends."""
import json

import numpy as np
import pytest
import torch

from tritonforge.engine.config import DataConfig, RecipeError, load_recipe
from tritonforge.engine.data import text
from tritonforge.engine.data.text import IGNORE, Packed, TokenWindows, load_tokens
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.train.trainer import Trainer
from support import Sink

SEP = 2  # the byte tokenizer's separator: a blank line


def _corpus(tmp_path, n=30):
    """Documents of varied lengths, each with a blank line inside (which is not a document boundary)."""
    docs = [f"doc {i} begins\n\n" + "xyz " * (i % 9 + 1) + f"end {i}" for i in range(n)]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return f, docs


def _expected(docs, val_fraction):
    """Per training token: the index of its document, and whether it is one of the closing separator tokens."""
    doc_of, closing = [], []
    for i, d in enumerate(docs):
        if text._is_val(d, val_fraction):
            continue
        n = len(d.encode())
        doc_of += [i] * (n + SEP)
        closing += [False] * n + [True] * SEP
    return np.array(doc_of), np.array(closing)


def test_segment_ids_positions_and_separator_targets_follow_documents(tmp_path):
    f, docs = _corpus(tmp_path)
    data = load_tokens(DataConfig(source=str(f), cache_dir=str(tmp_path / "cache"), val_fraction=0.2),
                       log=lambda *_: None)
    doc_of, closing = _expected(docs, 0.2)
    assert len(doc_of) == len(data.train)
    assert data.train_segments[:, 0].tolist() == np.flatnonzero(np.diff(doc_of, prepend=-1)).tolist()
    assert (data.train_segments[:, 1] == SEP).all()

    T = 37  # odd, and longer than most documents: windows span several
    windows = TokenWindows(data.train, T, 16, 1, seed=3, segments=data.train_segments, separator_loss=False)
    plain = TokenWindows(data.train, T, 16, 1, seed=3)
    rng = np.random.default_rng([3, 5])
    starts = rng.integers(0, len(data.train) - T, size=16)
    (x, y), (px, py) = windows.batch(5), plain.batch(5)
    assert isinstance(x, Packed) and torch.equal(x.idx, px)
    for row, s in enumerate(starts):
        docs_here = doc_of[s:s + T]
        expect_ids = np.cumsum(np.diff(docs_here, prepend=docs_here[0]) != 0)
        assert x.segment_ids[row].tolist() == expect_ids.tolist()
        first = np.array([max(s, int(np.flatnonzero(doc_of == d)[0])) for d in docs_here])
        assert x.position_ids[row].tolist() == (np.arange(s, s + T) - first).tolist()
        masked = closing[s + 1:s + T + 1]
        assert (y[row] == IGNORE).tolist() == masked.tolist()
        assert y[row][~torch.from_numpy(masked)].tolist() == py[row][~torch.from_numpy(masked)].tolist()
    assert x.segment_ids.max() > 0  # the test saw boundaries

    kept = TokenWindows(data.train, T, 16, 1, seed=3, segments=data.train_segments, reset_positions=False)
    kx, ky = kept.batch(5)
    assert kx.position_ids is None and torch.equal(ky, py)


def test_a_long_document_split_over_both_splits_becomes_runs_of_contiguous_text(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "SPLIT_PIECE_CHARS", 50)
    body = "".join(f"line {i:04d} of the one long document\n" for i in range(200))  # 7,400 chars: 148 pieces
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": body}) + "\n" + json.dumps({"text": "a short one"}))
    data = load_tokens(DataConfig(source=str(f), cache_dir=str(tmp_path / "cache"), val_fraction=0.3),
                       log=lambda *_: None)
    pieces = text._pieces(body)
    held = [text._is_val(p, 0.3) for p in pieces]
    for split, tokens, segments in (("train", data.train, data.train_segments), ("val", data.val, data.val_segments)):
        want_val = split == "val"
        runs = [i for i in range(len(pieces)) if held[i] == want_val and (i == 0 or held[i - 1] != want_val)]
        n_runs = len(runs) + (split == ("val" if text._is_val("a short one", 0.3) else "train"))
        assert len(segments) == n_runs
        assert (np.diff(segments[:, 0]) > 0).all() and segments[0, 0] == 0
        # Only the run that ends the document (and the short document) close with the separator.
        ends = (segments[:, 1] == SEP).sum()
        assert ends == (held[-1] == want_val) + (n_runs - len(runs))
        assert len(tokens) > 0


def _tiny(**kw):
    base = dict(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", [dict(), dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1),
                                  dict(window=4)], ids=["gpt2", "llama", "window"])
def test_a_packed_window_computes_each_document_as_if_alone(backend, opts):
    """With segment ids and positions restarting per document, the logits of a packed window are those of
    each document run by itself: nothing leaks across the boundary, in the forward or the backward."""
    names = ("attention", "rope", "swiglu", "layer_norm", "rms_norm")
    ops = resolve({name: backend for name in names}, "cpu")
    torch.manual_seed(0)
    model = GPT(_tiny(**opts), ops)
    lengths = [5, 1, 11, 3]  # a document of one token, and one past a 16-key block
    idx = torch.randint(0, 64, (1, sum(lengths)))
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(idx, segment_ids=seg, position_ids=pos)
    alone = torch.cat([model(part) for part in idx.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # The gradient of one document's loss reaches no other document's inputs.
    emb = model.wte.weight
    x = emb[idx].detach().requires_grad_(True)
    model.wte = torch.nn.Identity()
    out = model(x, segment_ids=seg, position_ids=pos)
    out[0, :5].sum().backward()
    assert x.grad[0, 5:].abs().max() == 0 and x.grad[0, :5].abs().max() > 0


def test_one_segment_is_the_unpacked_model_bit_for_bit():
    torch.manual_seed(0)
    model = GPT(_tiny(pos="rope"), resolve({}, "cpu"))
    idx, targets = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    zeros, pos = torch.zeros(3, 20, dtype=torch.int32), torch.arange(20).expand(3, 20)
    assert torch.equal(model(idx, targets), model(idx, targets, segment_ids=zeros, position_ids=pos))


def _recipe(tmp_path, backend, *extra):
    f, _ = _corpus(tmp_path, n=120)
    return load_recipe(None, [
        "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.context=48", "--train.seq_len=48",
        "--model.pos=rope", "--train.batch_size=4", "--train.steps=3", "--train.eval_every=0", "--train.eval_batches=1",
        "--train.sample_tokens=0", "--optim.warmup_steps=1", f"--data.source={f}", f"--data.cache_dir={tmp_path / 'c'}",
        f"--run.dir={tmp_path / backend}", "--data.packing=documents", "--data.separator_loss=false",
        *[f"--kernels.{op}={backend}" for op in ("attention", "rope", "layer_norm", "cross_entropy")], *extra])


def test_packed_training_has_the_same_losses_on_torch_and_triton(tmp_path):
    losses = {}
    for backend in ("torch", "triton"):
        trainer = Trainer(_recipe(tmp_path, backend), stream=Sink())
        x, _ = trainer.task.batch(0, 0)
        assert isinstance(x, Packed) and x.segment_ids.max() > 0  # the windows do span documents
        losses[backend] = [trainer.train_step(s).loss.item() for s in range(3)]
        losses[backend].append(trainer.task.evaluate(trainer.model)["val_loss"])
        trainer.close()
    assert losses["triton"] == pytest.approx(losses["torch"], rel=2e-5)


def test_packing_is_refused_where_there_are_no_documents_to_keep_apart(tmp_path):
    for extra in (["--model.arch=lstm"], ["--train.task=forecast", "--data.source=series"]):
        with pytest.raises(RecipeError, match="data.packing"):
            load_recipe(None, ["--data.packing=documents", *extra])
    with pytest.raises(RecipeError, match="data.packing"):
        load_recipe(None, ["--data.packing=windows"])
