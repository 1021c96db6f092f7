"""Benchmarks on CPU: the checks run, a wrong backend FAILS without being timed, outputs have their
columns, arguments are validated, and the GPU command's summary is built from the stages' results."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tritonforge.engine import cli
from tritonforge.engine.ops import reference as op_reference, select as op_select, table as op_table
from tritonforge.engine.bench import catalogue, kernelsets, ops, shapes, synthetic, train
from tritonforge.engine.bench.args import BenchError

from support import load_gpu_tool

# One small shape per op (the Triton interpreter runs these in about a second).
TINY_SHAPES = ("attention=1x2x16x16:causal,layer_norm=8x32,rms_norm=8x32,mlp=10x8,dwconv=1x4x2x2,"
               "cross_entropy=8x16x64,optimizer=1x16x64x16:clip,rope=1x2x1x5x8,swiglu=5x12,nt_xent=34x20")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GPT = ["--model.preset=gpt-tiny", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2",
            "--model.context=16", "--train.seq_len=16", "--train.batch_size=2"]

gpu = load_gpu_tool()


def run_ops(tmp_path, *args):
    json_path, csv_path = tmp_path / "ops.json", tmp_path / "ops.csv"
    code = ops.main(["--device", "cpu", "--json", str(json_path), "--csv", str(csv_path), *args])
    return code, json.loads(json_path.read_text())["rows"], list(csv.DictReader(open(csv_path)))


def test_ops_torch_backend_checks_and_times_every_op(tmp_path, capsys):
    code, rows, csv_rows = run_ops(tmp_path, "--backends", "torch", "--shapes", TINY_SHAPES)
    assert code == 0
    assert [r["op"] for r in rows] == list(catalogue.bench_ops())
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_err"] < catalogue.TOLERANCE[torch.float32]
        assert r["fwdbwd_ms"] > 0 and r["fwdbwd_rate"] > 0 and r["vs_torch"] == 1.0
        assert r["timer"] == "CPU"
        if r["op"] != "optimizer":
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0
    assert rows[0]["unit"] == "TFLOP/s" and rows[1]["unit"] == "GB/s"
    assert tuple(csv_rows[0]) == ops.COLUMNS and len(csv_rows) == len(rows)
    assert "fwd ms (CPU)" in capsys.readouterr().out


def test_ops_wrong_backend_fails_loudly_and_is_not_timed(tmp_path, monkeypatch, capsys):
    def wrong_layer_norm(x, weight=None, bias=None, eps=1e-5):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps) * 1.1

    monkeypatch.setitem(op_table.find("layer_norm").functions, "layer_norm", (wrong_layer_norm, "layer_norm"))
    code, rows, csv_rows = run_ops(tmp_path, "--op", "layer_norm,rms_norm", "--backends", "torch",
                                   "--shapes", "8x32")
    assert code == 1
    bad, good = rows
    assert bad["status"] == "FAILED" and "relative error" in bad["note"]
    assert bad["fwd_ms"] is None and bad["fwdbwd_ms"] is None and bad["fwdbwd_rate"] is None
    assert good["status"] == "ok"
    assert csv_rows[0]["status"] == "FAILED"
    assert "!!! FAILED layer_norm / torch" in capsys.readouterr().err


def test_ops_triton_rows_through_the_interpreter(tmp_path):
    """Every op has a Triton kernel, checked through the interpreter."""
    code, rows, _ = run_ops(tmp_path, "--backends", "torch,triton", "--shapes", TINY_SHAPES)
    assert code == 0
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    assert {r["op"] for r in triton_rows} == set(catalogue.bench_ops())
    for r in triton_rows:
        assert r["status"] == "ok" and r["fwdbwd_ms"] > 0, r


def test_ops_muon_rows_beside_adamw(tmp_path):
    """Both Muon backends are checked against the float64 Muon and timed beside torch's AdamW row."""
    code, rows, _ = run_ops(tmp_path, "--op", "optimizer", "--backends", "torch,torch-muon,triton-muon",
                            "--shapes", "1x16x64x16:clip")
    assert code == 0
    assert [r["backend"] for r in rows] == ["torch", "torch-muon", "triton-muon"]
    for r in rows:
        assert r["status"] == "ok" and r["max_err"] < catalogue.OPTIMIZER_TOLERANCE and r["fwdbwd_ms"] > 0, r


def test_ops_nondeterministic_triton_attention(tmp_path):
    code, rows, _ = run_ops(tmp_path, "--op", "attention", "--backends", "torch,triton,triton-nondet",
                            "--shapes", "1x1x20x16:causal")
    assert code == 0
    assert [r["backend"] for r in rows] == ["torch", "triton", "triton-nondet"]
    assert all(r["status"] == "ok" for r in rows), rows


def test_ops_attention_with_packed_documents(tmp_path):
    """``:segments=N``: the torch (dense boolean mask) and triton backends checked against the masked
    reference; the FLOPs count each document's square, not S²; SDPA's flash backend takes no mask."""
    code, rows, _ = run_ops(tmp_path, "--op", "attention", "--backends", "torch,triton,triton-nondet,sdpa-flash",
                            "--shapes", "1x2x40x16:causal:segments=3")
    assert code == 0
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "not available"], rows
    assert rows[0]["shape"] == "1x2x40x16 causal segments=3"
    shape = shapes.parse_shapes("attention=1x2x40x16:causal:segments=3", ["attention"])["attention"][0]
    assert shape.score_pairs() == 14 * 14 + 13 * 13 + 13 * 13
    assert shape.segment_ids(torch.device("cpu")).tolist() == [[0] * 14 + [1] * 13 + [2] * 13]


def test_ops_peer_that_cannot_run_is_not_available(tmp_path):
    code, rows, _ = run_ops(tmp_path, "--op", "attention", "--backends", "torch,sdpa-cudnn",
                            "--shapes", "1x1x16x16:full")
    assert code == 0
    assert rows[1]["backend"] == "sdpa-cudnn" and rows[1]["status"] == "not available" and rows[1]["note"]


def test_ops_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ops.png"
    assert ops.main(["--device", "cpu", "--op", "rms_norm", "--backends", "torch", "--shapes", "8x32",
                     "--plot", str(png)]) == 0
    assert png.stat().st_size > 0


def test_ops_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchError, match="--plot needs matplotlib"):
        ops.parse_args(["--device", "cpu", "--plot", "x.png"])


def test_shape_syntax():
    chosen = shapes.parse_shapes("attention=4x16x4096x128,layer_norm=32768x768", ["attention", "layer_norm"])
    assert [s.label for s in chosen["attention"]] == ["4x16x4096x128 causal", "4x16x4096x128 full"]
    assert chosen["layer_norm"] == [shapes.MatrixShape(32768, 768)]
    both = shapes.parse_shapes("64x256", ["layer_norm", "rms_norm"])
    assert both["layer_norm"] == both["rms_norm"] == [shapes.MatrixShape(64, 256)]
    opt = shapes.parse_shapes("124m:clip,2x64x512x32", ["optimizer"])["optimizer"]
    assert opt[0].name == "124M" and opt[0].clip and 124e6 < opt[0].numel < 125e6
    assert [(s.layers, s.width, s.vocab, s.context, s.clip) for s in opt[1:]] == [(2, 64, 512, 32, False),
                                                                                    (2, 64, 512, 32, True)]
    default = shapes.parse_shapes("default", list(catalogue.bench_ops()))
    assert len(default["attention"]) == 12 and all(s.batch * s.seq == 16384 for s in default["attention"])
    assert len(default["optimizer"]) == 4 and len(default["layer_norm"]) == 4
    assert default["mlp"][0] == shapes.MatrixShape(128 * 56 * 56, 96)
    assert shapes.parse_shapes("mlp=100x24", ["mlp"])["mlp"] == [shapes.MatrixShape(100, 24)]
    assert default["dwconv"][0] == shapes.ImageShape(128, 96, 56, 56)
    assert shapes.parse_shapes("dwconv=2x96x56x56", ["dwconv"])["dwconv"] == [shapes.ImageShape(2, 96, 56, 56)]
    with pytest.raises(BenchError, match="not a dwconv shape; expected NxCxHxW"):
        shapes.parse_shapes("dwconv=96x56x56", ["dwconv"])


@pytest.mark.parametrize("argv, message", [
    (["--op", "softmax"], "--op: unknown op 'softmax'"),
    (["--op", "layer_norm", "--backends", "flex"], "--backends: 'flex' is not a backend of layer_norm"),
    (["--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
    (["--op", "attention", "--shapes", "4x16x4096"], "--shapes: '4x16x4096' is not a attention shape"),
    (["--op", "attention", "--shapes", "1x2x8x16:segments=9"], "segments=9 must be between 1 and S=8"),
    (["--op", "attention", "--shapes", "1x2x8x16:segments=0"], "segments=0 must be between 1 and S=8"),
    (["--op", "attention,layer_norm", "--shapes", "64x256"], "prefix a spec with its op"),
    (["--op", "layer_norm", "--shapes", "rms_norm=64x256"], "which --op does not select"),
    (["--op", "layer_norm", "--shapes", "0x256"], "must be > 0"),
    (["--op", "optimizer", "--shapes", "7B"], "is not a optimizer shape"),
    (["--rep-ms", "0"], "--rep-ms"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_ops_argument_errors(argv, message):
    with pytest.raises(BenchError, match=message):
        ops.parse_args(["--device", "cpu", *argv])


def test_ops_cpu_defaults():
    args = ops.parse_args(["--device", "cpu"])
    assert args.dtypes == [torch.float32]
    assert args.backends["attention"] == ["torch", "triton"]
    # the built-in ops' tiny set, and the tiny shapes of the ops whose registry row brings its own case
    own = {op.name: op_table.bench_of(op.name).shapes["tiny"] for op in op_table.TABLE if op.bench is not None}
    assert args.shapes == {**shapes.SHAPE_SETS["tiny"], **own}
    args = ops.parse_args(["--device", "cpu", "--backends", "liger,torch", "--op", "attention,rms_norm"])
    assert args.backends == {"attention": ["torch"], "rms_norm": ["torch", "liger"]}


def test_train_tiny_gpt_torch_vs_torch(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = train.main(["recipes/gpt_cpu.toml", "--kernels", "torch", "--vs", "torch", "--steps", "2", "--warmup", "1",
                       "--json", str(out), "--csv", str(tmp_path / "train.csv"), *TINY_GPT])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernels"], r["mode"], r["status"]) for r in rows] == [("torch", "eager", "ok")] * 2
    first, second = rows
    assert first["unit"] == "tok" and first["items_per_s"] > 0 and first["step_ms"] > 0
    assert first["first_loss"] == second["first_loss"]  # same seed, same weights, same batch
    assert first["vs"] == 1.0 and second["vs"] > 0
    assert first["tflops"] > 0 and first["mfu"] is None  # no datasheet peak for a CPU
    text = capsys.readouterr().out
    assert "tok/s (CPU)" in text and "vs torch" in text
    header = (tmp_path / "train.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == train.COLUMNS


def test_train_tuned_row_beside_the_kernel_sets(tmp_path, capsys):
    """--tuned adds "auto (tuned)" to the table; on a CPU nothing is measured and it is torch."""
    out = tmp_path / "train.json"
    code = train.main(["recipes/gpt_cpu.toml", "--kernels", "torch", "--vs", "torch", "--tuned", "--steps", "1",
                       "--warmup", "1", "--json", str(out), *TINY_GPT])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernels"] for r in rows] == ["torch", "torch", "auto (tuned)"]
    assert rows[2]["status"] == "ok" and set(rows[2]["backends"].values()) == {"torch"}
    assert rows[2]["vs"] > 0
    text = capsys.readouterr().out
    assert "no CUDA device here: auto serves torch" in text and "auto (tuned) (eager): attention=torch" in text


@pytest.mark.slow
def test_train_under_ddp_with_muon_shared_and_not(tmp_path):
    """Two DDP processes: one row per kernel set and sharing mode, the same first loss, all tokens counted."""
    out = tmp_path / "train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "engine", "bench", "train", "recipes/gpt_cpu.toml", "--kernels", "torch", "--vs",
                           "torch", "--muon-sharing", "off,on", "--steps", "1", "--warmup", "1", "--json", str(out),
                           "--parallel.strategy=ddp", "--run.threads=1", *TINY_GPT],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["muon_sharing"], r["world"], r["status"]) for r in rows] == [("off", 2, "ok")] * 2 + [("on", 2, "ok")] * 2
    assert len({r["first_loss"] for r in rows}) == 1
    assert proc.stdout.count("Muon sharing") == 1  # the table, printed by rank 0 only


def test_train_image_classifier_on_synthetic_images(tmp_path):
    recipe = tmp_path / "cnn.toml"
    recipe.write_text('[model]\narch = "resnet"\nwidth = 8\ndepths = [1, 1, 1, 1]\nimage_size = 16\n'
                      '[data]\nsource = "shapes"\n[train]\nbatch_size = 2\nactivation_checkpointing = "blocks"\n')
    out = tmp_path / "train.json"
    assert train.main([str(recipe), "--kernels", "torch", "--vs", "torch", "--steps", "1", "--warmup", "1",
                       "--checkpointing", "blocks,none", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["checkpointing"] for r in rows] == ["blocks", "blocks", "none", "none"]
    assert rows[0]["unit"] == "img" and rows[0]["status"] == "ok" and rows[0]["tflops"] > 0
    assert 0 < rows[0]["activations_mb"] < rows[2]["activations_mb"]


def test_train_with_and_without_activation_checkpointing(tmp_path, capsys):
    """One row per kernel set and policy; the checkpointed rows keep less for the backward, lose the same."""
    out, table_csv = tmp_path / "train.json", tmp_path / "train.csv"
    code = train.main(["recipes/gpt_cpu.toml", "--kernels", "torch", "--vs", "torch", "--checkpointing",
                       "none,blocks", "--steps", "1", "--warmup", "1", "--json", str(out), "--csv", str(table_csv),
                       *TINY_GPT, "--model.n_layer=3"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["checkpointing"], r["status"]) for r in rows] == [("none", "ok")] * 2 + [("blocks", "ok")] * 2
    plain, checkpointed = rows[0], rows[2]
    assert 0 < checkpointed["activations_mb"] < plain["activations_mb"]
    assert rows[1]["activations_mb"] == plain["activations_mb"]  # the figure is exact, not timed: no noise
    assert {r["first_loss"] for r in rows} == {plain["first_loss"]}  # recomputation changes no number
    assert plain["vs"] == checkpointed["vs"] == 1.0  # each policy against the --vs set under the same policy
    assert plain.get("peak_gb") is None  # CUDA only
    text = capsys.readouterr().out
    assert "checkpointing" in text and "activations MB" in text and "torch (eager, checkpointing blocks):" in text
    assert tuple(table_csv.read_text().splitlines()[0].split(",")) == train.COLUMNS


def test_train_uses_the_recipes_checkpointing_by_default():
    args = train.parse_args(["recipes/gpt_cpu.toml", "--train.activation_checkpointing=every_2", *TINY_GPT,
                             "--model.n_layer=3"])
    assert args.checkpointing == ["every_2"]
    task = synthetic.SyntheticTask(args.recipe, op_select.resolve({}, "cpu"), torch.device("cpu"))
    assert [type(b).__name__ for b in task.model.blocks] == ["CheckpointedBlock", "Block", "CheckpointedBlock"]


def test_saved_activations_count_each_storage_once_until_the_backward_frees_it():
    linear = torch.nn.Linear(64, 64)
    with synthetic.SavedActivations(linear) as saved:  # linear saves its input (and its weight: not counted),
        linear(torch.randn(8, 64)).relu().sum().backward()  # relu its output
    assert (saved.peak, saved.bytes) == (2 * 8 * 64 * 4, 0)
    a = torch.randn(8, 64, requires_grad=True)
    with synthetic.SavedActivations(linear) as saved:
        b = a.exp()  # saves its output
        (b[:4] * b[4:]).sum().backward()  # saves two views of the same storage
    assert (saved.peak, saved.bytes) == (8 * 64 * 4, 0)


def test_train_mismatched_loss_is_failed(tmp_path, monkeypatch):
    def wrong_loss(x, weight, targets, bias=None, **options):
        return 2 * op_reference.torch_linear_cross_entropy(x, weight, targets, bias, **options)

    real_resolve = op_select.resolve

    def resolve(choices=None, device="cpu", deterministic=True):  # the --kernels set gets the wrong loss
        ops_ = real_resolve(choices, device, deterministic)
        if choices and choices.get("attention") == "auto":
            return ops_.replace(linear_cross_entropy=wrong_loss)
        return ops_

    monkeypatch.setattr(op_select, "resolve", resolve)
    code = train.main(["recipes/gpt_cpu.toml", "--kernels", "auto", "--vs", "torch", "--steps", "1", "--warmup", "1",
                       "--json", str(tmp_path / "t.json"), *TINY_GPT])
    assert code == 1
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows[0]["status"] == "FAILED" and "first-step loss" in rows[0]["note"]


def test_kernel_sets(monkeypatch):
    assert kernelsets.parse_kernel_set("triton", "--kernels") == "triton"
    assert kernelsets.parse_kernel_set("attention=triton, layer_norm=torch", "--kernels") == {
        "attention": "triton", "layer_norm": "torch"}
    recipe = train.load_recipe("recipes/gpt_cpu.toml")
    cpu = torch.device("cpu")
    explicit = kernelsets.resolve_set({"layer_norm": "auto"}, recipe, cpu).backends
    assert explicit == {op: "torch" for op in op_table.op_names()}  # unnamed ops on torch, auto is torch on CPU
    lenient = kernelsets.resolve_set("triton", recipe, cpu).backends  # the interpreter is on in the tests
    assert lenient == {op: "triton" for op in op_table.op_names()}
    monkeypatch.setattr(op_table, "kernels_module", lambda: None)
    with pytest.raises(op_table.KernelSelectionError, match="the kernels package cannot be imported"):
        kernelsets.resolve_set({"attention": "triton"}, recipe, cpu)


@pytest.mark.parametrize("argv, message", [
    (["--kernels", "fast"], "--kernels: 'fast' is neither a kernel set"),
    (["--vs", "attention=flash"], "--vs: kernels.attention: unknown backend 'flash'"),
    (["--kernels", "softmax=triton"], "--kernels: unknown op 'softmax'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--checkpointing", "none,every_0"], "--checkpointing: 'every_0' is not one of none, blocks, every_N"),
    (["--checkpointing", "blocks,blocks"], "--checkpointing: 'blocks,blocks' names a policy twice"),
    (["--train.activation_checkpointing=none,blocks"],
     "train.activation_checkpointing: 'none,blocks' is not one of"),
    (["--train.nope=1"], "unknown key train.nope"),
    (["stray"], "unexpected argument 'stray'"),
    (["--muon-sharing", "sometimes"], "--muon-sharing: expected on, off or on,off"),
    (["--muon-sharing", "off,on"], "--muon-sharing: compares Muon's iterations shared or not over the ranks"),
])
def test_train_argument_errors(argv, message):
    with pytest.raises((BenchError, train.RecipeError), match=message):
        train.parse_args(["recipes/gpt_cpu.toml", *argv])


def test_cli_dispatch(capsys):
    assert cli.main(["bench"]) == 2
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown bench subcommand 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--op", "nope"]) == 2
    assert "--op: unknown op 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "train", "missing.toml"]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_gpu_summary_from_stage_results(tmp_path):
    def row(backend, rate, status="ok", **kw):
        return {"op": "layer_norm", "shape": "32768x768", "dtype": "bf16", "backend": backend, "status": status,
                "unit": "GB/s", "fwdbwd_rate": rate, "pct_peak": rate and rate / 30, "vs_torch": kw.get("vs")}

    ops_rows = [row("torch", 900.0, vs=1.0), row("triton", 1800.0, vs=2.0), row("compile", 1200.0),
                row("liger", None, "not available")]
    ceilings = {"matmul_tflops": 800.0, "copy_gbps": 3000.0}
    (tmp_path / "ops.json").write_text(json.dumps({"env": {"gpu": "H100"}, "ceilings": ceilings, "rows": ops_rows}))
    flex = [dict(row("torch", 1.0), op="attention", shape="s"), dict(row("flex", 300.0, vs=1.5), op="attention",
                                                                        shape="s", unit="TFLOP/s")]
    (tmp_path / "ops_flex.json").write_text(json.dumps({"rows": flex}))
    documents = [dict(row(b, rate, vs=vs), op="attention", shape="d segments=8", unit="TFLOP/s")
                 for b, rate, vs in (("torch", 200.0, 1.0), ("triton", 400.0, 2.0), ("flex", 250.0, 1.25))]
    (tmp_path / "ops_documents.json").write_text(json.dumps({"rows": documents}))
    train_rows = [{"kernels": "triton", "mode": "eager", "status": "ok", "items_per_s": 400000.0, "mfu": 35.0,
                   "vs": 1.3},
                  {"kernels": "torch", "mode": "eager", "status": "ok", "items_per_s": 300000.0, "mfu": 27.0}]
    (tmp_path / "train.json").write_text(json.dumps({"recipe": {"run": {"name": "gpt2-124m"}}, "rows": train_rows}))
    (tmp_path / "anchors_train.json").write_text(json.dumps({"gpt124m.eager.tok_per_s": 306904.0}))
    stages = [gpu.StageResult("tests", "ok", 60.0, "12 passed"), gpu.StageResult("ops", "ok", 200.0)]
    text, payload = gpu.summarize(tmp_path, stages)
    items = {line["item"]: line for line in payload["summary"]}
    ln = items["layer_norm 32768x768 bf16"]
    assert ln["triton"] == "1800 (60%)" and ln["torch"] == "900 (30%)" and ln["triton_vs_torch"] == "2.00"
    assert ln["best_peer"].startswith("compile 1200")
    assert items["attention s bf16"]["best_peer"].startswith("flex 300")
    docs = items["attention d segments=8 bf16"]  # the documents pass: every backend of its own rows
    assert docs["triton"].startswith("400") and docs["torch"].startswith("200")
    assert docs["best_peer"].startswith("flex 250") and docs["triton_vs_torch"] == "2.00"
    gpt = items["train gpt2-124m eager"]
    assert gpt["triton"].startswith("400,000") and gpt["best_peer"] == "nanoGPT-style SDPA 306,904"
    assert "H100" in text and "3000 GB/s" in text and "stage tests" in text
    assert not gpu.failed_anywhere(stages, payload)
    assert gpu.failed_anywhere(stages + [gpu.StageResult("train", "timed out")], payload)


def test_gpu_train_summary_for_convnext():
    train = {"recipe": {"run": {"name": "convnext-tiny"}, "model": {"arch": "convnext", "preset": "convnext-tiny"}},
             "rows": [{"kernels": k, "mode": m, "status": "ok", "items_per_s": v, "unit": "img", "vs": 1.0}
                      for k, m, v in (("triton", "eager", 3600.0), ("torch", "eager", 2500.0),
                                      ("torch", "compile", 3500.0))]}
    anchors = {"convnext_tiny.eager.img_per_s": 2529.0, "convnext_tiny.compile.img_per_s": 3546.0,
               "gpt124m.eager.tok_per_s": 306904.0}
    eager, compiled, target = gpu.train_summary(train, anchors)
    assert eager["unit"] == "img/s" and eager["triton"] == "3,600" and eager["best_peer"] == "torchvision 2,529"
    assert compiled["torch"] == "3,500" and compiled["best_peer"] == "torchvision 3,546"
    # eager with the Triton kernels against torch.compile of the torch model, measured in the same run
    assert target["triton_vs_torch"] == f"{3600 / 3500:.2f}" and target["note"] == "at or above torch.compile"
    train["rows"] = train["rows"][1:]  # no eager triton row: no target line
    assert len(gpu.train_summary(train, anchors)) == 2


def test_gpu_helpers(tmp_path):
    assert gpu.parse_pytest_counts("...\n3 failed, 40 passed, 2 skipped in 9.1s") == {
        "failed": 3, "passed": 40, "skipped": 2}
    assert gpu.parse_pytest_counts("no tests ran") == {}
    code, seconds, tail = gpu.run_logged(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], tmp_path / "x.log", 1.0)
    assert code is None and seconds < 20 and tail == ["started"]
    with pytest.raises(BenchError, match="--only: unknown stage 'bench'"):
        gpu.parse_args(["--only", "bench"])
    a = gpu.parse_args(["--only", "ops,train", "--ops", "mlp", "--recipe", "recipes/convnext_tiny.toml"])
    assert (a.only, a.ops, a.recipe) == (["ops", "train"], "mlp", "recipes/convnext_tiny.toml")
    with pytest.raises(BenchError, match="--ops: unknown op 'gemm'"):
        gpu.parse_args(["--ops", "mlp,gemm"])
    # the ops stage passes each op only backends it has: bench ops would reject the others
    assert gpu.backends_for("mlp") == "torch,triton,compile"
    assert "flex" not in gpu.backends_for("all") and "sdpa-flash" in gpu.backends_for("attention,mlp")
    ops.parse_args(["--device", "cpu", "--op", "mlp", "--backends", gpu.backends_for("mlp")])
    assert gpu.main([]) == 2 or torch.cuda.is_available()


def test_gpu_budget_skips_a_stage_without_time(tmp_path):
    result = gpu._stage("late", [sys.executable, "-c", "print(1)"], tmp_path, 100, gpu.Budget(5))
    assert result.status == "not run" and "--budget" in result.note
    assert gpu.failed_anywhere([result], {"summary": []})


def test_gpu_summary_lists_the_tuned_choices(tmp_path):
    tuning = {"attention": {"choice": "triton", "why": "1.40x torch's speed", "candidates": {
        "torch": {"ms": 2.8, "status": "ok"}, "sdpa-cudnn": {"ms": None, "status": "raised"},
        "triton": {"ms": 2.0, "status": "ok"}}}}
    (tmp_path / "tune_gpt2_124m.json").write_text(json.dumps({"tuning": tuning}))
    text, payload = gpu.summarize(tmp_path, [gpu.StageResult("tune", "ok", 80.0)])
    (line,) = [s for s in payload["summary"] if s["item"] == "tune gpt2_124m attention"]
    assert line["triton"] == "triton" and line["torch"] == "torch 2.8, sdpa-cudnn raised, triton 2"
    assert "1.40x torch's speed" in text
    assert "tune" in gpu.parse_args(["--only", "tune"]).only


#: Each command module's interface, called by module: ``ops.main``, ``check.run``, ``train.table``...
COMMAND_INTERFACE = {"main", "run", "parse_args", "table"}


def test_each_bench_helper_is_defined_once():
    """The bench package is split by concern: a function lives in one module, which the others import it from
    (the commands' own ``main``, ``run``, ``parse_args`` and ``table`` aside); no module is over 450 lines."""
    import ast
    from pathlib import Path

    folder = Path(ROOT) / "engine" / "bench"
    where: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 450, f"{path.name} has {len(text.splitlines())} lines"
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in COMMAND_INTERFACE:
                where.setdefault(node.name, []).append(path.name)
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, f"defined in more than one bench module: {twice}"


def test_a_backward_that_cannot_rerun_is_timed_alone_after_a_fresh_forward():
    """``time_after_ms`` keeps the setup (a forward) out of the timed region: the figure is never the
    difference of two noisy medians, so it cannot come out negative."""
    import time as _time

    from tritonforge.engine.bench.timing import time_after_ms

    calls = []

    def setup():
        _time.sleep(0.05)  # a slow forward, outside the timed region
        calls.append("setup")
        return len(calls)

    ms = time_after_ms(setup, lambda n: calls.append(n), torch.device("cpu"), reps=3)
    assert 0 <= ms < 50 and calls.count("setup") == 4  # one warm-up pair, then three timed
    x = torch.randn(4, requires_grad=True)
    ms = time_after_ms(lambda: (x * 2).sum(), lambda y: y.backward(), torch.device("cpu"), grad_to_none=[x])
    assert ms > 0 and torch.equal(x.grad, torch.full((4,), 2.0))  # gradients reset before each repeat
