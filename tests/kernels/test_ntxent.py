"""nt_xent (kernels.ntxent) against a float64 reference: the loss and the gradient of the projections.

In the interpreter the kernels walk rows and columns in blocks of 16 (``_BLOCK_INTERPRET``), so N in
{4, 16, 18, 34} covers one partial block, one exact block and ragged ends, and D in {3, 20, 64} a padded
and an exact projection width. The reference is the PyTorch composition in float64 on the very values the
kernel reads (fp16 inputs upcast exactly), so what is left is the kernel's own error:

* loss: relative 1e-6 in fp32 (summation order); 1e-5 in fp16 (fp32 accumulation of exact fp16 products).
* gradient: ``max |actual - reference|`` over the reference's largest magnitude. fp32: 1e-5; fp16: 2e-3 (the
  softmax weights are rounded to fp16 for the second dot, as FlashAttention rounds P).
* bf16 dots are wrong in the interpreter (ENGINEERING.md); bf16 runs on the GPU only, 2e-2.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tritonforge.kernels._common import dot_precision
from tritonforge.kernels.ntxent import nt_xent, nt_xent_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
LOSS_TOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 2e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def compare(n, d, dtype, temperature=0.5, row_start=0, num_rows=None, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(dtype)
    actual_z = z.to(device, copy=True).requires_grad_()
    ref_z = z.double().requires_grad_()
    loss = nt_xent(actual_z, temperature, row_start, num_rows)
    loss.backward()
    ref = nt_xent_reference(ref_z, temperature, row_start, num_rows)
    ref.backward()
    assert loss.dtype == torch.float32 and actual_z.grad.dtype == dtype
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1.0)
    grad_err = (actual_z.grad.cpu().double() - ref_z.grad).abs().max() / ref_z.grad.abs().max()
    assert loss_err <= LOSS_TOL[dtype], (loss_err, loss.item(), ref.item())
    assert grad_err <= GRAD_TOL[dtype], grad_err


@pytest.mark.parametrize("n", [4, 16, 18, 34])
@pytest.mark.parametrize("d", [3, 20, 64])
def test_whole_batch_fp32(n, d):
    compare(n, d, torch.float32)


@pytest.mark.parametrize("n,d", [(4, 3), (18, 20), (34, 64)])
def test_whole_batch_fp16(n, d):
    compare(n, d, torch.float16)


@pytest.mark.parametrize("row_start,num_rows", [(0, 1), (5, 14), (16, 16), (30, 4), (17, 1)])
def test_query_rows_of_a_gathered_batch(row_start, num_rows):
    """One process's rows of the gathered views: every row is a key, the gradient reaches all of them."""
    compare(34, 20, torch.float32, row_start=row_start, num_rows=num_rows)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
def test_temperatures(temperature):
    compare(18, 20, torch.float32, temperature=temperature)


def test_strided_rows_and_large_scale():
    """Rows read in place from a wider tensor; the norms make the loss independent of the scale."""
    wide = (1e3 * torch.randn(18, 40)).to(DEVICE)
    z = wide[:, 5:25]
    assert z.stride(0) == 40
    assert torch.allclose(nt_xent(z, 0.3), nt_xent_reference(z.double(), 0.3).float(), rtol=LOSS_TOL[torch.float32])


def test_backends_agree_through_the_registry():
    from tritonforge.engine.ops import select as op_select

    z = torch.randn(18, 20, device=DEVICE)
    torch_loss = op_select.resolve({"nt_xent": "torch"}, DEVICE).nt_xent(z, 0.2)
    triton_ops = op_select.resolve({"nt_xent": "triton"}, DEVICE)
    assert triton_ops.backends["nt_xent"] == "triton"
    assert torch.allclose(triton_ops.nt_xent(z, 0.2), torch_loss, rtol=1e-5)


@pytest.mark.parametrize("n,d,temperature,rows,match", [
    (2, 8, 0.5, None, "at least 4"),  # a batch of one image: no negatives
    (6, 8, 0.5, None, None),
    (7, 8, 0.5, None, "even number"),
    (8, 8, 0.0, None, "temperature must be a finite number > 0"),
    (8, 8, -1.0, None, "temperature"),
    (8, 600, 0.5, None, "projection width"),
    (8, 8, 0.5, (6, 4), "query rows"),
])
def test_bad_inputs_name_the_problem(n, d, temperature, rows, match):
    z = torch.randn(n, d, device=DEVICE)
    call = lambda: nt_xent(z, temperature, *(rows or ()))  # noqa: E731
    if match is None:
        call()
        return
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not INTERPRET, reason="the 64-bit offsets are checked in the interpreter")
def test_row_offsets_past_two_to_the_31():
    """Rows 2**30 elements apart (a view over 6 GiB of untouched virtual memory): a 32-bit row offset wraps."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(f"""
        import os, sys, types
        os.environ["TRITON_INTERPRET"] = "1"
        pkg = types.ModuleType("tritonforge"); pkg.__path__ = [{root!r}]
        sys.modules["tritonforge"] = pkg
        import torch
        from tritonforge.kernels.ntxent import nt_xent, nt_xent_reference
        stride, d = 2 ** 30, 8
        base = torch.empty(3 * stride + d, dtype=torch.float16)
        z = base.as_strided((4, d), (stride, 1))
        z.copy_(torch.randn(4, d).half())
        z.requires_grad_()
        loss = nt_xent(z, 0.5)
        loss.backward()
        ref_z = z.detach().double().requires_grad_()
        ref = nt_xent_reference(ref_z, 0.5)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-4, (loss.item(), ref.item())
        assert (z.grad.double() - ref_z.grad).abs().max() < 1e-2
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="bf16 dots are wrong in the interpreter; compiled kernels only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(512, 128), (1030, 256)])
def test_gpu_shapes(dtype, n, d):
    torch.backends.cuda.matmul.allow_tf32 = False  # an IEEE fp32 dot, for the fp32 tolerance
    compare(n, d, dtype, temperature=0.2, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    compare(34, 20, torch.float32, device="cuda:1")


def test_fp32_dots_follow_torchs_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        assert dot_precision(torch.float32) == ("ieee" if before == "highest" else "tf32")
        torch.set_float32_matmul_precision("high")  # what torch.backends.cuda.matmul.allow_tf32 = True sets
        assert dot_precision(torch.float32) == "tf32"
        compare(18, 20, torch.float32)  # the interpreter computes the tf32 dot in full precision
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
