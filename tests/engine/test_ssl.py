"""Self-supervised pretraining: recipe checks, views, the few-label subset, exact resume, init_from of a
pretraining run, and two processes matching one under DDP.

Runs use a ResNet of width 8 on 32x32 generated shapes, a few steps long; the k-NN bank and the linear
probe are kept small.
"""
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonforge.engine.ops import select as op_select
from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.data.images import labelled_subset, load_images
from tritonforge.engine.ssl import augment
from tritonforge.engine.ssl.augment import Draw
from tritonforge.engine.tasks import build_task
from tritonforge.engine.train.trainer import Trainer
from support import Sink

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.arch=resnet", "--model.width=8", "--model.depths=1,1,1,1", "--model.num_classes=8",
        "--data.source=shapes-b", "--data.num_images=400", "--data.val_fraction=0.1", "--train.task=simclr",
        "--train.batch_size=8", "--train.eval_batches=2", "--train.eval_every=0", "--train.log_every=1",
        "--train.sample_tokens=0", "--train.grad_clip=0", "--optim.name=adamw", "--optim.lr=1e-3",
        "--optim.warmup_steps=1", "--run.threads=1", "--run.device=cpu", "--ssl.unlabelled=shapes",
        "--ssl.knn_bank=64", "--ssl.probe_epochs=5", "--ssl.blur_p=0.5"]


def tiny(tmp_path, *extra):
    return load_recipe(None, TINY + [f"--data.cache_dir={tmp_path.parent / 'cache'}", f"--run.dir={tmp_path / 'run'}",
                                     *extra])


def fit(recipe) -> dict:
    trainer = Trainer(recipe, stream=Sink())
    try:
        return trainer.fit()
    finally:
        trainer.close()


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [(m["step"], m["loss"]) for m in records if m["kind"] == "train"]


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (["--train.batch_size=1"], "train.batch_size"),
    (["--ssl.temperature=0"], "ssl.temperature"),
    (["--ssl.temperature=-0.5"], "ssl.temperature"),
    (["--ssl.view_size=64"], "ssl.view_size"),
    (["--model.arch=gpt", "--data.source=stdlib"], "model.arch = 'gpt'"),
    (["--model.arch=lstm", "--data.source=stdlib"], "model.arch = 'lstm'"),
    (["--ssl.crop_scale=0.5,0.2"], "ssl.crop_scale"),
    (["--data.labels_per_class=5"], "data.labels_per_class"),
    (["--parallel.strategy=fsdp"], "parallel.strategy"),
])
def test_bad_recipes_name_the_field(tmp_path, overrides, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.").replace("(", r"\(")):
        tiny(tmp_path, *overrides)


def test_the_few_label_subset_is_fixed_and_too_few_is_refused():
    labels = np.random.default_rng(5).integers(0, 4, 200)
    subset = labelled_subset(labels, 10)
    assert np.array_equal(subset, labelled_subset(labels.copy(), 10))  # the same for every run
    assert np.array_equal(np.bincount(labels[subset]), [10, 10, 10, 10])
    assert set(labelled_subset(labels, 5)) <= set(subset)  # the first N of a fixed order: nested
    with pytest.raises(RecipeError, match="data.labels_per_class = 100: class"):
        labelled_subset(labels, 100)


def test_a_classifier_trains_on_the_subset_only(tmp_path):
    r = load_recipe(None, ["--model.arch=resnet", "--model.width=8", "--model.num_classes=8", "--data.source=shapes-b",
                           "--data.num_images=400", "--data.labels_per_class=3", "--train.batch_size=6",
                           f"--data.cache_dir={tmp_path.parent / 'cache'}"])
    task = build_task(r, op_select.resolve({}, "cpu"), torch.device("cpu"), log=lambda *_: None)
    seen = np.concatenate([task.subset[task.train_batches.indices(s)] for s in range(8)])
    assert set(seen) == set(task.subset) and len(task.subset) == 24


# ---------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------

def test_views_do_not_depend_on_how_many_processes_share_the_batch(tmp_path):
    cfg = tiny(tmp_path).ssl
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)

    def views(lo, hi):
        g = torch.Generator().manual_seed(11)
        return augment.view(images[lo:hi], cfg, 24, Draw(g, 8, lo, hi - lo, torch.device("cpu")))

    whole = views(0, 8)
    assert whole.shape == (8, 3, 24, 24) and 0 <= whole.min() and whole.max() <= 1
    assert torch.equal(torch.cat([views(0, 4), views(4, 8)]), whole)


def test_training_batches_are_pairs_of_views_and_a_pure_function_of_the_step(tmp_path):
    task = build_task(tiny(tmp_path), op_select.resolve({}, "cpu"), torch.device("cpu"), log=lambda *_: None)
    x, _ = task.batch(3, 0)
    assert x.shape == (16, 3, 32, 32)
    assert torch.equal(x, task.batch(3, 0)[0]) and not torch.equal(x, task.batch(4, 0)[0])
    assert not torch.equal(x[0], x[1])  # two different views of one image


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------

class Crash(Exception):
    """Stands for a kill: the run stops at once, saving nothing."""


@pytest.mark.parametrize("task", ["simclr", "vicreg"])
def test_kill_and_resume_is_exact(tmp_path, task):
    common = (f"--train.task={task}", "--train.steps=4", "--checkpoint.every=2")
    straight = fit(tiny(tmp_path / "a", *common))
    assert set(straight) >= {"knn_top1", "probe_top1"}
    trainer = Trainer(tiny(tmp_path / "b", *common), stream=Sink())

    def crash(step):
        if step == 3:
            raise Crash
    trainer.task.on_step_end = crash
    with pytest.raises(Crash):
        trainer.fit()
    trainer.close()
    resumed = fit(tiny(tmp_path / "b", *common, "--checkpoint.resume=latest"))
    assert train_losses(tmp_path / "a" / "run") == train_losses(tmp_path / "b" / "run")
    assert (resumed["knn_top1"], resumed["probe_top1"]) == (straight["knn_top1"], straight["probe_top1"])


def test_a_classifier_starts_from_a_pretraining_run(tmp_path):
    fit(tiny(tmp_path / "ssl", "--train.steps=2"))
    lines = []
    classify = load_recipe(None, [a for a in TINY if not a.startswith(("--train.task", "--ssl."))] + [
        f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={tmp_path / 'ft'}", "--train.steps=1",
        f"--train.init_from={tmp_path / 'ssl' / 'run'}", "--data.labels_per_class=2", "--train.freeze=stem.*,stages.*"])
    trainer = Trainer(classify, stream=Sink())
    trainer.log.print = lines.append
    from tritonforge.engine import transfer

    pretrained = transfer.source_state(str(tmp_path / "ssl" / "run"), log=lines.append)
    for name, tensor in trainer.task.model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, pretrained[name]), name
    assert not any(k.startswith(("projector.", "backbone.")) for k in pretrained)
    assert any("projection head is dropped: projector.0.weight" in line for line in lines)
    assert [n for n, p in trainer.task.model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    trainer.fit()
    trainer.close()


# ---------------------------------------------------------------------------------------------------
# Sources without labels
# ---------------------------------------------------------------------------------------------------

def label_free_source(tmp_path, kind: str, monkeypatch, n: int = 12) -> Path:
    """``n`` images of various sizes and nothing else: a parquet file with only an image column, or a flat
    folder of image files (no class folders)."""
    Image = pytest.importorskip("PIL.Image", reason="PIL is needed to write the test images")
    datasets = pytest.importorskip("datasets", reason="local image sources are read through datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(n)]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        rows = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}})
        path = tmp_path / "unlabelled.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    path = tmp_path / "flat"
    path.mkdir()
    for i, img in enumerate(images):
        img.save(path / f"{i}.png")
    return path


@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_label_free_sources_join_pretraining(tmp_path, kind, monkeypatch):
    """A source without labels (no label column, no class folders) adds all of its images to the pool; its
    missing validation split does not matter either (data.val_split names one it lacks)."""
    source = label_free_source(tmp_path, kind, monkeypatch)
    recipe = tiny(tmp_path, f"--ssl.unlabelled={source}", "--data.val_split=test", "--train.steps=3")
    trainer = Trainer(recipe, stream=Sink())
    try:
        pool = trainer.task.pool
        assert len(pool) == 360 + 12  # the 360 shapes-b training images and all 12 label-free ones
        assert pool[np.arange(360, 372)].shape == (12, 32, 32, 3)
        summary = trainer.fit()
    finally:
        trainer.close()
    assert np.isfinite([loss for _, loss in train_losses(tmp_path / "run")]).all() and "knn_top1" in summary
    cached = load_images(dataclasses.replace(recipe.data, source=str(source)), 32, labelled=False)  # from the cache
    assert (len(cached.train_images), len(cached.val_images), cached.classes) == (12, 0, [])
    assert (cached.train_labels == -1).all()


@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_labelled_uses_of_a_label_free_source_name_the_field(tmp_path, kind, monkeypatch):
    """A classifier, and data.source of pretraining (its labels score the k-NN and the probe), need labels:
    a source without them stops the run before it writes anything, naming data.label_field."""
    source = label_free_source(tmp_path, kind, monkeypatch)
    classify = load_recipe(None, ["--model.arch=resnet", "--model.width=8", "--model.num_classes=8",
                                  f"--data.source={source}", f"--data.cache_dir={tmp_path / 'cache'}",
                                  f"--run.dir={tmp_path / 'classify'}", "--run.device=cpu"])
    with pytest.raises(RecipeError, match=r"data\.label_field: column 'label' not found.*ssl\.unlabelled"):
        Trainer(classify, stream=Sink())
    with pytest.raises(RecipeError, match=r"data\.label_field: column 'label' not found"):
        Trainer(tiny(tmp_path, f"--data.source={source}", "--ssl.unlabelled="), stream=Sink())
    assert not (tmp_path / "classify").exists() and not (tmp_path / "run").exists()


GATHER_WORKER = """
import os, sys, types
pkg = types.ModuleType("tritonforge"); pkg.__path__ = [sys.argv[1]]; sys.modules["tritonforge"] = pkg
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tritonforge.engine.ops import select as op_select
from tritonforge.engine.tasks.ssl import gather_views

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
views = torch.randn(16, 10)  # 8 images, two views each, in pairs; the same on every process
for backend in ("torch", "triton"):
    ops = op_select.resolve({"nt_xent": backend}, "cpu")
    torch.manual_seed(1)
    whole = torch.nn.Linear(10, 6)
    part = DistributedDataParallel(torch.nn.Linear(10, 6))
    part.module.load_state_dict(whole.state_dict())
    rows = 16 // world
    ops.nt_xent(whole(views), 0.5).backward()
    mine = views[rank * rows:(rank + 1) * rows]
    ops.nt_xent(gather_views(part(mine)), 0.5, rank * rows, rows).backward()
    for a, b in zip(part.module.parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
print("match")
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """NT-Xent over views gathered from 2 processes under DDP gives the gradients of one process holding
    the whole batch: every process's views are negatives for every other's, and the gradients each
    process's loss sends to another's views reach them (torch and Triton backends)."""
    script = tmp_path / "worker.py"
    script.write_text(GATHER_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(ROOT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("match") == 2, done.stdout[-3000:] + done.stderr[-3000:]
