"""The CNN stack: ResNet and ConvNeXt shapes and sizes, image data and augmentation, a short training run,
and ConvNeXt on the Triton LayerNorm matching the torch backend."""
import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from tritonforge.engine.ops import reference as op_reference, select as op_select, table as op_table
from tritonforge.engine.config import DataConfig, RecipeError, load_recipe
from tritonforge.engine.data.images import ImageBatches, crop_and_flip, eval_indices, load_images, to_model_input
from tritonforge.engine.tasks import build_task
from tritonforge.engine.tasks.vision import build_model, forward_flops
from tritonforge.engine.train.trainer import Trainer
from support import Sink

#: Tolerances of the Triton LayerNorm (fp32, interpreter) against torch's through a whole ConvNeXt.
FP32_ATOL, FP32_RTOL = 1e-4, 1e-4


def model_config(*overrides):
    return load_recipe(None, ["--data.source=shapes", *overrides]).model


def torch_ops():
    return op_select.resolve({op: "torch" for op in op_table.op_names()}, "cpu")


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

# Parameter counts of torchvision's resnet50 and convnext_tiny (1000 classes) and of the usual CIFAR
# ResNet-18 (10 classes); forward multiply-accumulates per image at the preset's resolution. Built on the
# meta device: shapes only, no memory or arithmetic.
@pytest.mark.parametrize("preset, params, gmacs", [
    ("resnet18-cifar", 11_173_962, 0.556),
    ("resnet50", 25_557_032, 4.089),
    ("convnext-tiny", 28_589_128, 4.456),
    ("convnext-cifar", 8_535_498, 0.111),
])
def test_presets_shapes_params_and_flops(preset, params, gmacs):
    cfg = model_config(f"--model.preset={preset}")
    with torch.device("meta"):
        model = build_model(cfg, torch_ops())
        out = model(torch.zeros(2, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (2, cfg.num_classes)
    assert sum(p.numel() for p in model.parameters()) == params
    assert forward_flops(cfg) / 2e9 == pytest.approx(gmacs, abs=1e-3)


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_channels_last_matches_contiguous(arch):
    cfg = model_config(f"--model.arch={arch}", "--model.width=8", "--model.depths=1,1,2,1", "--model.block=bottleneck")
    torch.manual_seed(0)
    model = build_model(cfg, torch_ops()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_convnext_norms_read_contiguous_nhwc_views():
    """In channels_last, every LayerNorm input is a contiguous (..., C) view: the kernel needs no layout copy."""
    seen = []

    def layer_norm(x, weight, bias, eps):
        seen.append(x.is_contiguous())
        return op_reference.torch_layer_norm(x, weight, bias, eps)

    ops = torch_ops().replace(layer_norm=layer_norm)
    model = build_model(model_config("--model.arch=convnext", "--model.width=8", "--model.depths=1,1,1,1"), ops)
    model.to(memory_format=torch.channels_last)(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert len(seen) == 9 and all(seen)  # stem, 4 blocks, 3 downsamplings, the final norm


def test_image_recipes_are_validated():
    with pytest.raises(RecipeError, match="data.source"):
        load_recipe(None, ["--model.arch=resnet"])
    with pytest.raises(RecipeError, match="model.image_size"):
        load_recipe(None, ["--model.preset=convnext-tiny", "--model.image_size=100", "--data.source=shapes"])
    with pytest.raises(RecipeError, match=r"model.depths\[2\]"):
        load_recipe(None, ["--model.arch=resnet", "--model.depths=2,2,0,2", "--data.source=shapes"])
    with pytest.raises(RecipeError, match="model.stem"):
        load_recipe(None, ["--model.arch=convnext", "--model.stem=tiny", "--data.source=shapes"])
    with pytest.raises(RecipeError, match="train.label_smoothing"):
        load_recipe(None, ["--model.arch=resnet", "--train.label_smoothing=1.5", "--data.source=shapes"])


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def test_shapes_cache_is_deterministic_and_rebuilt_when_broken(tmp_path):
    cfg = DataConfig(source="shapes", cache_dir=str(tmp_path / "a"), num_images=300, val_fraction=0.1)
    a = load_images(cfg, 16)
    assert a.train_images.shape == (270, 16, 16, 3) and a.val_images.shape == (30, 16, 16, 3)
    assert a.train_images.dtype == np.uint8 and len(a.classes) == 10
    assert set(np.unique(a.train_labels)) == set(range(10))
    b = load_images(DataConfig(source="shapes", cache_dir=str(tmp_path / "b"), num_images=300, val_fraction=0.1), 16)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.val_labels, b.val_labels)
    # A folder left half-written is never used: it is rebuilt.
    (a.path / "val_images.npy").write_bytes(b"garbage")
    c = load_images(cfg, 16)
    np.testing.assert_array_equal(c.val_images, b.val_images)


def test_batches_are_epochs_and_shards_of_one_global_batch():
    one = ImageBatches(50, batch_size=8, grad_accum=2, seed=3)
    two = ImageBatches(50, batch_size=4, grad_accum=2, seed=3, world=2)
    for step in range(10):
        for micro in range(2):
            np.testing.assert_array_equal(
                one.indices(step, micro), np.concatenate([two.indices(step, micro, r) for r in (0, 1)]))
    # The first 48 images drawn are distinct, and the first 50 cover the set exactly once.
    drawn = np.concatenate([one.indices(s, m) for s in range(4) for m in range(2)])
    assert sorted(drawn[:50]) == list(range(50))
    evaluated = np.concatenate([idx for r in (0, 1) for idx in eval_indices(10, 3, 5, r, 2)])
    assert sorted(evaluated) == list(range(10))
    # Every rank runs the same batches (a sharded forward is a collective): 9 images over 2 ranks use 8.
    shards = [[len(idx) for idx in eval_indices(9, 2, 5, r, 2)] for r in (0, 1)]
    assert shards[0] == shards[1] == [2, 2]


def test_crop_and_flip_is_a_shifted_window_or_its_mirror():
    images = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = crop_and_flip(images, 2, g)
    padded = torch.nn.functional.pad(images, (0, 0, 2, 2, 2, 2))
    flipped = 0
    for i in range(len(images)):
        windows = [padded[i, t:t + 8, l:l + 8] for t in range(5) for l in range(5)]
        if any(torch.equal(out[i], w) for w in windows):
            continue
        assert any(torch.equal(out[i], w.flip(1)) for w in windows), i
        flipped += 1
    assert 0 < flipped < len(images)
    again = crop_and_flip(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_model_input_is_normalized_resized_and_channels_last():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = to_model_input(images, mean, std, 16, torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last)
    pixels = images.permute(0, 3, 1, 2).double() / 255
    expected = (pixels - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=1e-5)
    assert to_model_input(images, mean, std, 32, torch.contiguous_format).shape == (4, 3, 32, 32)


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_local_image_sources_decode_once(tmp_path, kind, monkeypatch):
    Image = pytest.importorskip("PIL.Image", reason="PIL is needed to write the test images")
    datasets = pytest.importorskip("datasets", reason="local image sources are read through datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = i % 3
        size = (20 + i, 12 + 2 * i)  # various sizes and aspect ratios: resized, then centre-cropped
        noise = rng.integers(0, 20, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(np.full((size[1], size[0], 3), 60 * label, np.uint8) + noise)
        if kind == "imagefolder":
            folder = tmp_path / "src" / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i}.png")
        else:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "label": label})
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        (tmp_path / "src").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "train.parquet")
    cfg = DataConfig(source=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    data = load_images(cfg, 8)
    assert data.train_images.shape[1:] == (8, 8, 3) and len(data.train_images) + len(data.val_images) == 24
    if kind == "imagefolder":
        assert data.classes == ["class0", "class1", "class2"]
    # Each image is one flat grey level per class (plus noise): the labels followed their images.
    levels = data.train_images.reshape(len(data.train_images), -1).mean(axis=1)
    np.testing.assert_allclose(levels, 60 * data.train_labels + 9.5, atol=2.0)
    assert load_images(cfg, 8).path == data.path  # read back from the cache


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

TINY = ["--model.arch=resnet", "--model.width=16", "--model.depths=1,1,1,1", "--data.source=shapes",
        "--data.num_images=1200", "--data.val_fraction=0.1", "--train.batch_size=32", "--train.eval_batches=4",
        "--train.log_every=10", "--train.grad_clip=0", "--optim.name=sgd", "--optim.lr=0.05", "--optim.min_lr=0",
        "--optim.warmup_steps=5", "--optim.schedule=onecycle", "--optim.weight_decay=5e-4", "--run.device=cpu",
        "--run.threads=1", "--run.name=t"]


def tiny_recipe(tmp_path, *extra):
    return load_recipe(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}", f"--run.dir={tmp_path / 'run'}", *extra])


def test_batches_are_a_pure_function_of_step(tmp_path):
    r = tiny_recipe(tmp_path)
    task = build_task(r, torch_ops(), torch.device("cpu"), log=lambda *_: None)
    x1, y1 = task.batch(7, 0)
    x2, y2 = task.batch(7, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (32, 3, 32, 32)
    assert not torch.equal(task.batch(8, 0)[0], x1)


def test_short_training_run_beats_chance(tmp_path):
    r = tiny_recipe(tmp_path, "--train.steps=80", "--train.eval_every=0", "--train.label_smoothing=0.1",
                    "--train.ema_decay=0.9")
    sink = Sink()
    trainer = Trainer(r, stream=sink)
    summary = trainer.fit()
    trainer.close()
    assert summary["val_acc"] > 0.3, summary  # chance is 0.1
    ema, live = trainer.task.ema.state_dict(), trainer.task.model.state_dict()
    assert not torch.equal(ema["fc.weight"], live["fc.weight"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_acc"} <= records[-1].keys()
    assert "img/s" in sink.text


# ---------------------------------------------------------------------------------------------------
# ConvNeXt on the Triton kernels
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["layer_norm", "mlp", "dwconv"])
def test_convnext_triton_ops_match_torch(op):
    """ConvNeXt's LayerNorms, its fused block tails (GELU, fc2, LayerScale, stochastic depth, residual) or its
    depthwise convolutions on the Triton kernels give the torch backend's outputs and gradients."""
    triton_ops = op_select.resolve({op: "triton"}, "cpu")
    cfg = model_config("--model.arch=convnext", "--model.width=8", "--model.depths=1,1,2,1",
                       "--model.drop_path=0.5")
    torch.manual_seed(0)
    ref = build_model(cfg, torch_ops()).to(memory_format=torch.channels_last)
    with torch.no_grad():  # LayerScale at 1e-6 would hide the blocks: make every branch count
        for name, p in ref.named_parameters():
            if name.endswith("layer_scale") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    tri = build_model(cfg, triton_ops).to(memory_format=torch.channels_last)
    tri.load_state_dict(ref.state_dict())
    # one image for the depthwise convs, whose 7x7 filters are slow in the Triton interpreter (the kernel's
    # own tests cover batches)
    x = torch.randn(1 if op == "dwconv" else 4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for model in (ref, tri):
        torch.manual_seed(1)  # the same samples dropped by stochastic depth in both
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=FP32_ATOL, rtol=FP32_RTOL)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=FP32_ATOL, rtol=FP32_RTOL, msg=name)


class Crash(Exception):
    """Stands for a kill: the run stops at once, saving nothing."""


def test_kill_and_resume_is_exact_with_augmentation_and_ema(tmp_path):
    common = ("--model.width=8", "--train.steps=6", "--checkpoint.every=3", "--train.eval_every=0",
              "--train.log_every=1", "--train.ema_decay=0.9")

    def fit(run_dir, *extra, crash_at=None):
        trainer = Trainer(tiny_recipe(tmp_path, *common, f"--run.dir={run_dir}", *extra), stream=Sink())
        if crash_at is not None:
            update_ema = trainer.task.on_step_end

            def on_step_end(step):
                update_ema(step)
                if step == crash_at:
                    raise Crash
            trainer.task.on_step_end = on_step_end
        try:
            return trainer.fit()
        finally:
            trainer.close()

    straight = fit(tmp_path / "a")
    with pytest.raises(Crash):
        fit(tmp_path / "b", crash_at=5)
    resumed = fit(tmp_path / "b", "--checkpoint.resume=latest")
    assert (resumed["val_loss"], resumed["val_acc"]) == (straight["val_loss"], straight["val_acc"])  # EMA weights

    def train_losses(run_dir):
        return [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if m["kind"] == "train"]
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
