"""``tritonforge kernels check`` on CPU: the kernels pass through the interpreter, a wrong kernel fails the
check with exit status 1, the interpreter is switched on by the command itself, and the GPU command stops
its kernel benchmarks when the check fails."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonforge import kernels
from tritonforge.engine import cli
from tritonforge.engine.ops import table as op_table
from tritonforge.engine.optim import build as optim_build
from tritonforge.engine.bench import cases as bench_cases
from tritonforge.engine.bench import check, checkgpu, checkrows, optimizer, shapes
from tritonforge.engine.bench.args import BenchError

from support import load_gpu_tool

ROOT = Path(__file__).resolve().parents[2]
#: The CPU check runs the kernels through the interpreter; a session that compiles them for a GPU
#: (TRITON_INTERPRET=0) imported them compiled, and the check rightly refuses to run them on CPU tensors.
in_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="the kernels were imported without the Triton interpreter")

gpu = load_gpu_tool()


def run_check(tmp_path, *args):
    path = tmp_path / "check.json"
    code = cli.main(["kernels", "check", "--device", "cpu", "--json", str(path), *args])
    return code, json.loads(path.read_text())["rows"]


@in_interpreter
def test_every_op_and_backend_passes_on_cpu(tmp_path, capsys):
    code, rows = run_check(tmp_path, "--op", "rms_norm,optimizer", "--dtype", "fp32,bf16", "--sizes", "odd")
    assert code == 0
    assert {(r["op"], r["backend"]) for r in rows} == {(op, b) for op in ("rms_norm", "optimizer")
                                                       for b in ("torch", "triton")}
    assert {r["shape"] for r in rows if r["op"] == "rms_norm"} == {
        "1x1000", "37x1000", "add_rms_norm 1x1000", "add_rms_norm 37x1000"}
    assert {r["dtype"] for r in rows if r["op"] == "rms_norm"} == {"fp32", "bf16"}
    assert {r["shape"].split()[0] for r in rows if r["op"] == "optimizer"} == set(optimizer.OPTIMIZERS)
    for r in rows:
        assert r["status"] == "ok" and r["reference"] == "fp64", r
        assert 0 < r["forward"] <= r["tolerance"] and 0 < r["backward"] <= r["tolerance"]
    norm = next(r for r in rows if r["op"] == "rms_norm" and r["dtype"] == "bf16")
    assert set(norm["errors"]) == {"y", "dx", "dw"} and norm["tolerance"] == check.TOLERANCE[torch.bfloat16]
    fused = next(r for r in rows if r["shape"].startswith("add_rms_norm"))
    assert set(fused["errors"]) == {"y|sum", "dx", "dresidual", "dw"}
    adamw = next(r for r in rows if r["shape"].startswith("adamw"))
    assert set(adamw["errors"]) == {"update", "exp_avg", "exp_avg_sq"}
    out = capsys.readouterr().out
    assert "| tolerance |" in out and "bf16 0.02" in out and "optimizer (fp32) 0.001" in out


@in_interpreter
def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch, capsys):
    right = kernels.layer_norm

    def wrong(x, weight=None, bias=None, eps=1e-5):
        return right(x, weight, bias, eps) * 1.01  # 1% off: past every dtype's tolerance

    monkeypatch.setattr(kernels, "layer_norm", wrong)
    code, rows = run_check(tmp_path, "--op", "layer_norm", "--dtype", "fp32", "--sizes", "small")
    assert code == 1
    assert [r["status"] for r in rows if r["shape"].startswith("add_layer_norm")] == ["ok", "ok"]
    by_backend = {r["backend"]: r for r in rows if r["shape"] == "64x256"}
    assert by_backend["torch"]["status"] == "ok"
    bad = by_backend["triton"]
    assert bad["status"] == "FAIL" and "above the tolerance: y 1.00e-02, dx" in bad["note"]
    captured = capsys.readouterr()
    assert "| FAIL" in captured.out
    assert "!!! FAIL layer_norm / triton" in captured.err and "--kernels.OP=torch" in captured.err


@in_interpreter
def test_a_kernel_that_raises_fails_and_bf16_dots_wait_for_a_gpu(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(kernels, "gelu_linear_residual", broken)
    code, rows = run_check(tmp_path, "--op", "mlp", "--dtype", "bf16,fp32", "--sizes", "small")
    assert code == 1
    status = {(r["backend"], r["dtype"]): r for r in rows}
    assert status["torch", "bf16"]["status"] == "ok" and status["torch", "fp32"]["status"] == "ok"
    assert status["triton", "bf16"]["status"] == "not checked" and "GPU" in status["triton", "bf16"]["note"]
    assert status["triton", "fp32"]["status"] == "FAIL" and "illegal memory access" in status["triton", "fp32"]["note"]


def test_the_command_switches_the_interpreter_on_itself():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "engine", "kernels", "check", "--op", "rms_norm", "--sizes", "small",
                           "--dtype", "fp32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "through the Triton interpreter" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
    assert "4 rows (4 ok)" in proc.stdout


def _doubling_row() -> op_table.Op:
    """A stand-in row of the op table, ``x * 2``, with the OpBench a new op brings."""
    def case(shape, dtype, device):
        x = torch.randn(shape.rows, shape.cols, dtype=dtype, device=device, requires_grad=True)
        return bench_cases.Case("double", shape, dtype, device, [x], torch.randn_like(x), ("y", "dx"), {}, "GB/s")

    def reference(case):
        leaves = bench_cases.upcast(case)
        return bench_cases.backward_reference(case, 2 * leaves[0], leaves)

    bench = bench_cases.OpBench("MxN", lambda spec: [], {"tiny": [shapes.MatrixShape(3, 5)], "default": []}, case,
                              lambda ops, case: ops.double(case.inputs[0]), reference)
    return op_table.Op("double", "x * 2", {"double": (lambda x: 2 * x, lambda kernels, det: lambda x: x + x)},
                       bench=bench)


@in_interpreter
def test_a_new_row_of_the_op_table_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(op_table, "TABLE", op_table.TABLE + [_doubling_row()])
    code, rows = run_check(tmp_path, "--op", "double", "--dtype", "fp32")
    assert code == 0
    assert [(r["backend"], r["size"], r["shape"], r["status"]) for r in rows] == [
        ("torch", "small", "3x5", "ok"), ("triton", "small", "3x5", "ok")]


def test_every_registry_op_has_a_check_and_options_are_validated(monkeypatch):
    assert all(check.checkable(op) for op in op_table.op_names())
    assert set(optim_build.OPTIMIZERS) <= set(optimizer.OPTIMIZERS)
    assert check.parse_args(["--device", "cpu"]).sizes == ["small", "odd"]
    with pytest.raises(BenchError, match="--op: unknown name 'gemm'"):
        check.parse_args(["--device", "cpu", "--op", "gemm"])
    with pytest.raises(BenchError, match="'real' needs a CUDA device"):
        check.parse_args(["--device", "cpu", "--sizes", "real"])
    # the kernels are already imported here: with the interpreter off, the check refuses rather than run them
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(check.CheckError, match="TRITON_INTERPRET=1 tritonforge kernels check"):
        check.prepare_kernels(torch.device("cpu"))
    assert cli.main(["kernels", "check", "--device", "cpu", "--dtype", "fp8"]) == 2


def test_gpu_command_stops_its_benchmarks_when_the_check_fails(tmp_path):
    rows = [{"op": "attention", "backend": "triton", "shape": "1x2x64x32 causal", "dtype": "bf16", "status": "FAIL",
             "note": "above the tolerance: dq 3.1e-01", "tolerance": 0.02},
            {"op": "attention", "backend": "torch", "shape": "1x2x64x32 causal", "dtype": "bf16", "status": "ok"}]
    (tmp_path / "check.json").write_text(json.dumps({"rows": rows}))
    stages = [gpu.StageResult("check", "FAILED", 30.0, "2 rows (1 FAIL, 1 ok)")]
    assert gpu.check_failed(stages[0]) and not gpu.check_failed(gpu.StageResult("check", "ok"))
    text, payload = gpu.summarize(tmp_path, stages)
    line = next(line for line in payload["summary"] if line["item"].startswith("check attention triton"))
    assert line["triton"] == "FAIL" and "dq 3.1e-01" in line["note"]
    assert "check attention torch" not in text and gpu.failed_anywhere(stages, payload)
    assert gpu.STAGES[0] == "check"


def test_gpu_command_runs_the_check_first_and_no_benchmark_after_a_failure(tmp_path, monkeypatch):
    ran = []

    def fake(name, status="ok"):
        def stage(*args, **kwargs):
            ran.append(name)
            return gpu.StageResult(name, status)
        return stage

    monkeypatch.setattr(gpu, "stage_tests", fake("tests"))
    monkeypatch.setattr(gpu, "stage_ops", fake("ops"))
    monkeypatch.setattr(gpu, "stage_tune", fake("tune"))
    monkeypatch.setattr(gpu, "stage_train", fake("train"))
    a = gpu.parse_args(["--out", str(tmp_path)])
    monkeypatch.setattr(gpu, "stage_check", fake("check"))
    assert [s.status for s in gpu.run_stages(a, tmp_path, gpu.Budget(60))] == ["ok"] * 5
    assert ran == ["check", "tests", "tune", "ops", "train"]
    ran.clear()
    monkeypatch.setattr(gpu, "stage_check", fake("check", "FAILED"))
    stages = gpu.run_stages(a, tmp_path, gpu.Budget(60))
    assert ran == ["check", "tests", "tune"]  # tune rejects, by its own check, any kernel it finds wrong
    assert [(s.name, s.status) for s in stages] == [("check", "FAILED"), ("tests", "ok"), ("tune", "ok"),
                                                    ("ops", "not run"), ("train", "not run")]
    assert "kernels check failed" in stages[3].note


def test_a_nan_is_the_worst_error_and_fails():
    row = checkrows.new_check_row("rms_norm", "triton", "small", "8x32", "fp32", "fp64", 2e-3)
    row["errors"] = {"y": 1e-7, "dx": float("nan"), "dw": 5e-3}
    checkrows.judge(row)
    assert row["status"] == "FAIL" and row["worst"] == "dx" and row["forward"] == 1e-7
    assert "| nan " in check.table([row])


def test_gpu_only_rows_say_what_they_need_where_it_is_missing(monkeypatch):
    """One GPU: the other-device row is not checked and says so; too little free memory: the varlen row
    past 2^31 elements is not checked and names the memory it needs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    args = check.CheckArgs(["attention", "rms_norm"], [torch.bfloat16], ["small", "real"], torch.device("cuda"))
    rows = checkgpu.gpu_only_rows(args, log=lambda line: None, log_err=lambda line: None)
    assert [(r["size"], r["status"]) for r in rows] == [("other GPU", "not checked"), ("past 2^31", "not checked")]
    assert "two GPUs" in rows[0]["note"] and "GiB of free GPU memory" in rows[1]["note"]
    tokens, heads, head_dim = checkgpu.WIDE_VARLEN
    assert tokens * heads * head_dim > 2**31


@pytest.mark.gpu
def test_gpu_only_rows_pass_on_this_gpu():
    args = check.CheckArgs(["attention", "rope", "layer_norm"], [torch.bfloat16], ["small", "real"],
                           torch.device("cuda"))
    rows = checkgpu.gpu_only_rows(args, log=lambda line: None, log_err=print)
    assert all(r["status"] in ("ok", "not checked") for r in rows), rows
