"""Ahead-of-time compile checks: the report machinery on two sample kernels, then the variants that
the kernel modules list, compiled for sm_90 and sm_80 on a CPU-only machine (all but the repeats
``_sweep`` names).

The sample kernels below are compiled in worker processes, which import this file by path; keep
its module level light (no discovery at import: parametrization happens in
``pytest_generate_tests``).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from tritonforge.kernels import aot
from tritonforge.kernels.variant import Variant

# ----------------------------------------------------------------------------------------------
# Sample kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scaled(x, scale):
    """fp32 product of a tile and a scalar (a device helper, reached through the copy kernel)."""
    return x.to(tl.float32) * scale


@triton.jit
def _copy_scale_kernel(x_ptr, y_ptr, n_elements, scale, BLOCK: tl.constexpr):
    """y[i] = scale * x[i] for i < n_elements.

    Bandwidth-bound: reads and writes n_elements values once each; one BLOCK-wide tile per
    program, so each thread moves BLOCK / (32 * num_warps) contiguous values.
    """
    block_start = tl.program_id(0) * BLOCK
    offs = block_start + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, _scaled(x, scale).to(y_ptr.dtype.element_ty), mask=mask)


_copy_scale_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
             triton.Config({"BLOCK": 16384}, num_warps=1, num_stages=1)],
    key=["n_elements"])(_copy_scale_kernel)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N], fp32 accumulation, one BLOCK_M x BLOCK_N tile per program.

    Matrix-bound: each program reads BLOCK_M*K + K*BLOCK_N values and does 2*BLOCK_M*BLOCK_N*K
    FLOPs. Assumes M, N, K are multiples of the blocks (a sample, not a library kernel).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak)
        b = tl.load(b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _unlisted_kernel(x_ptr):
    """Listed by no variant: the coverage check must name it."""
    tl.store(x_ptr, 0.0)


COPY_SIGNATURE = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n_elements": "i32", "scale": "fp32"}
COPY_ALIGNED = ("x_ptr", "y_ptr", "n_elements")
MATMUL_SIGNATURE = {**{p: "*bf16" for p in ("a_ptr", "b_ptr", "c_ptr")},
                    **{i: "i32" for i in ("M", "N", "K", "stride_am", "stride_bk", "stride_cm")}}
MATMUL_UNIT_STRIDES = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1}
MATMUL_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_bk", "stride_cm")

COPY = Variant(kernel=_copy_scale_kernel, name="bf16 BLOCK=1024", signature=COPY_SIGNATURE,
               constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, kind="memory",
               aligned=COPY_ALIGNED)
COPY_UNALIGNED = Variant(kernel=_copy_scale_kernel, name="bf16 BLOCK=1024 unaligned",
                         signature=COPY_SIGNATURE, constexprs={"BLOCK": 1024}, num_warps=4,
                         num_stages=1, kind="memory", aligned=())
MATMUL = Variant(kernel=_matmul_kernel, name="bf16 128x128x64", signature=MATMUL_SIGNATURE,
                 constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, **MATMUL_UNIT_STRIDES},
                 num_warps=8, num_stages=3, kind="dot", aligned=MATMUL_ALIGNED)
# 4 stages of 128x128 + 128x256 bf16 tiles: 384 KB of shared memory, over both limits.
MATMUL_TOO_BIG = Variant(kernel=_matmul_kernel, name="bf16 128x256x128 s4",
                         signature=MATMUL_SIGNATURE,
                         constexprs={"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128,
                                     **MATMUL_UNIT_STRIDES},
                         num_warps=8, num_stages=4, kind="dot", aligned=MATMUL_ALIGNED)
COPY_CONFIGS = aot.config_variants(_copy_scale_autotuned, signature=COPY_SIGNATURE,
                                   kind="memory", aligned=COPY_ALIGNED, label="bf16")
SAMPLES = [COPY, COPY_UNALIGNED, MATMUL, MATMUL_TOO_BIG, *COPY_CONFIGS]


@pytest.fixture(scope="module")
def sample_rows():
    """(variant name, arch) -> row, for every sample compiled on both archs in one worker pool."""
    rows = aot.compile_all(SAMPLES, aot.DEFAULT_ARCHS)
    return {(r["variant"], r["arch"]): r for r in rows}


# ----------------------------------------------------------------------------------------------
# The machinery, on the samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", aot.DEFAULT_ARCHS)
@pytest.mark.parametrize("variant", [COPY, COPY_UNALIGNED, MATMUL], ids=lambda v: v.name)
def test_samples_compile_without_spills(sample_rows, variant, arch):
    row = sample_rows[variant.name, arch]
    assert row["error"] is None
    assert 0 < row["registers"] <= 255
    assert row["spill_bytes"] == 0 and row["over_budget"] == []
    assert 0 < row["warps_per_sm"] <= 64
    assert row["ok"], aot.format_table([row])


def test_matmul_uses_wgmma_on_sm90_and_mma_on_sm80(sample_rows):
    hopper, ampere = sample_rows[MATMUL.name, "sm_90"], sample_rows[MATMUL.name, "sm_80"]
    assert hopper["wgmma"] > 0
    assert ampere["mma"] > 0 and ampere["wgmma"] == 0
    # 3 stages of 128x64 + 64x128 bf16 tiles are staged in shared memory.
    assert hopper["shared_dynamic"] == 3 * (128 * 64 + 64 * 128) * 2


@pytest.mark.parametrize("arch", aot.DEFAULT_ARCHS)
def test_copy_vectorizes_only_when_aligned(sample_rows, arch):
    aligned, unaligned = sample_rows[COPY.name, arch], sample_rows[COPY_UNALIGNED.name, arch]
    # 1024 bf16 over 128 threads: one 128-bit load and one 128-bit store per thread.
    assert (aligned["vector_loads"], aligned["global_loads"]) == (1, 1)
    assert (aligned["vector_stores"], aligned["global_stores"]) == (1, 1)
    # Without the alignment specialization Triton cannot prove 16-byte accesses.
    assert unaligned["global_loads"] > 0 and unaligned["vector_loads"] == 0
    assert unaligned["global_stores"] > 0 and unaligned["vector_stores"] == 0


@pytest.mark.parametrize("arch", aot.DEFAULT_ARCHS)
def test_report_marks_configs_over_budget(sample_rows, arch):
    too_big = sample_rows[MATMUL_TOO_BIG.name, arch]
    assert too_big["error"] is None and not too_big["ok"]
    assert too_big["shared_bytes"] > aot.ARCHS[arch].shared_per_block
    assert any(o.startswith("shared") for o in too_big["over_budget"])
    assert too_big["blocks_per_sm"] == 0
    spilling = sample_rows["bf16 BLOCK=16384 w1 s1", arch]
    assert spilling["spill_bytes"] > 0 and any(o.startswith("spills") for o in
                                               spilling["over_budget"])
    assert "OVER BUDGET" in aot.format_table([too_big, spilling])


def test_over_budget_names_the_configs_to_prune(sample_rows):
    # Served from the cache that the fixture filled.
    rows = aot.over_budget(COPY_CONFIGS)
    assert {(r["variant"], r["arch"]) for r in rows} == {("bf16 BLOCK=16384 w1 s1", a)
                                                         for a in aot.DEFAULT_ARCHS}
    assert all(r["cached"] for r in rows)


def test_keep_reason_excuses_an_over_budget_row(sample_rows):
    row = sample_rows[MATMUL_TOO_BIG.name, "sm_80"]
    kept = Variant(**{**MATMUL_TOO_BIG.__dict__, "keep_reason": "the autotuner skips it here"})
    assert not aot.judge(row, MATMUL_TOO_BIG)["ok"]
    assert aot.judge(row, kept)["ok"]


def test_compile_variant_under_the_interpreter_uses_a_worker(sample_rows):
    row = aot.compile_variant(MATMUL, "sm_90")
    assert row["cached"]
    expected = sample_rows[MATMUL.name, "sm_90"]
    for key in ("registers", "spill_bytes", "shared_bytes", "wgmma", "warps_per_sm"):
        assert row[key] == expected[key]


def test_a_broken_variant_is_an_error_row_not_a_crash():
    bad = Variant(kernel=_copy_scale_kernel, name="missing n_elements",
                  signature={"x_ptr": "*bf16", "y_ptr": "*bf16", "scale": "fp32"},
                  constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, kind="memory")
    (row,) = aot.compile_all([bad], ["sm_80"], jobs=1)
    assert not row["ok"] and "'n_elements' missing from signature" in row["error"]
    assert "ERROR" in aot.format_table([row])
    with pytest.raises(RuntimeError, match="missing from signature"):
        aot.compile_variant(bad, "sm_80")


def test_a_stuck_worker_is_killed_and_reported():
    (row,) = aot.compile_all([COPY], ["sm_80"], jobs=1, timeout=0.01)
    assert not row["ok"] and row["error"].startswith("TimeoutError")


def test_damaged_cache_entries_are_recompiled(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    (first,) = aot.compile_all([COPY], ["sm_80"], jobs=1)
    (second,) = aot.compile_all([COPY], ["sm_80"], jobs=1)
    assert (first["cached"], second["cached"]) == (False, True)
    # A half-written analysis and a lost cubin: both must lead to a fresh compile, same result.
    (sidecar,) = tmp_path.glob("tritonforge_aot/*.json")
    sidecar.write_text(sidecar.read_text()[:20])
    for cubin in tmp_path.glob("*/*.cubin"):
        cubin.unlink()
    (third,) = aot.compile_all([COPY], ["sm_80"], jobs=1)
    assert third["cached"] is False and third["error"] is None
    for key in ("registers", "vector_loads", "vector_stores", "shared_bytes"):
        assert third[key] == first[key]


def test_an_analysis_stored_by_another_triton_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    (first,) = aot.compile_all([COPY], ["sm_80"], jobs=1)
    (sidecar,) = tmp_path.glob("tritonforge_aot/*.json")
    stored = json.loads(sidecar.read_text())
    assert stored["triton"] == triton.__version__
    # As if another Triton had written a (wrong) analysis under the same name.
    stored["triton"], stored["analysis"]["registers"] = "3.0.0", 1
    sidecar.write_text(json.dumps(stored))
    (second,) = aot.compile_all([COPY], ["sm_80"], jobs=1)
    assert second["cached"] is False and second["registers"] == first["registers"] > 1
    assert json.loads(sidecar.read_text())["triton"] == triton.__version__


def test_coverage_follows_calls_and_names_unlisted_kernels():
    module = sys.modules[_copy_scale_kernel.fn.__module__]
    found = aot.Discovery(variants=[COPY, MATMUL], jit_functions=aot.module_jit_functions(module),
                          modules=[module.__name__])
    tail = module.__name__.rpartition(".")[2]
    assert set(found.jit_functions) == {f"{tail}.{n}" for n in (
        "_scaled", "_copy_scale_kernel", "_matmul_kernel", "_unlisted_kernel")}
    assert found.uncovered() == [f"{tail}._unlisted_kernel"]


# ----------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("registers, shared, warps, arch, expected_warps, limiter", [
    (32, 0, 4, "sm_90", 64, "warps"),            # 1024 regs/warp: 64 warps fit, warp limit hit
    (255, 0, 8, "sm_90", 8, "registers"),        # 8192 regs/warp: 2 warps per sub-partition
    (128, 0, 4, "sm_80", 16, "registers"),       # 4096 regs/warp: 16 warps
    (64, 100 * 1024, 4, "sm_90", 8, "shared memory"),   # 228 KB // (100 KB + 1 KB) = 2 blocks
    (64, 100 * 1024, 4, "sm_80", 4, "shared memory"),   # 164 KB // 101 KB = 1 block
    (16, 0, 1, "sm_80", 32, "blocks"),           # 32 blocks of one warp
    (64, 228 * 1024, 4, "sm_90", 0, "shared memory"),   # over the per-block limit: no block
])
def test_occupancy(registers, shared, warps, arch, expected_warps, limiter):
    occ = aot.occupancy(registers, shared, warps, arch)
    assert occ["warps_per_sm"] == expected_warps
    assert occ["occupancy_limiter"] == limiter


RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function matmul:
  REG:107 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTX = """
\tcp.async.cg.shared.global [ %r494 + 0 ], [ %rd12 + 0 ], 0x10, %r70;
\tcp.async.ca.shared.global [ %r496 + 0 ], [ %rd13 + 0 ], 0x8, %r70;
\t@%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\t@!%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
\tld.global.v2.b64 { %rd5, %rd6 }, [ %rd3 + 0 ];
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd7, %rd8, 1, 1, 1, 0, 1;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f3, %f4, %f5, %f6 }, { %r5 }, { %r6 }, { %f3 };
\t@%p3 st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
\tst.global.b32 [ %rd4 + 0 ], { %r7 };
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r8], [%rd9, {%r9, %r10}], [%r11];
\tcp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd10, {%r9, %r10}], [%r12];
\tld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r13 + 0 ];
// ld.global.v4.b32 in a comment is not an instruction
"""


def test_parse_resource_usage():
    assert aot.parse_resource_usage(RESOURCE_USAGE, "matmul") == {
        "registers": 107, "stack_bytes": 16, "local_bytes": 8, "shared_static": 1024}
    with pytest.raises(ValueError, match="other"):
        aot.parse_resource_usage(RESOURCE_USAGE, "other")


def test_count_ptx():
    assert aot.count_ptx(PTX) == {"wgmma": 1, "mma": 1, "global_loads": 6, "vector_loads": 4,
                                  "global_stores": 3, "vector_stores": 2}


def test_parse_ptxas_log():
    log = ("ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to insufficient register resources for the wgmma pipeline in the "
           "function 'matmul' in line 1758\n"
           "    2544 bytes stack frame, 6644 bytes spill stores, 5108 bytes spill loads\n")
    parsed = aot.parse_ptxas_log(log)
    assert (parsed["spill_stores"], parsed["spill_loads"]) == (6644, 5108)
    assert parsed["ptxas_notes"] == ["wgmma.mma_async instructions are serialized due to "
                                     "insufficient register resources for the wgmma pipeline"]


def test_cli_filters_writes_json_and_rejects_unknown_archs(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert aot.main(["--arch", "sm_90", "--kernel", "no_such_kernel", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["rows"] == []
    printed = capsys.readouterr().out
    assert "no kernel variants match" in printed
    assert f"triton {triton.__version__} (supported " in printed
    assert json.loads(out.read_text())["triton"] == triton.__version__
    with pytest.raises(SystemExit):
        aot.main(["--arch", "sm_70"])


# ----------------------------------------------------------------------------------------------
# Every variant the kernel modules list
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _discovery() -> aot.Discovery:
    return aot.discover()


def _aligned_pointer(variant: Variant) -> bool:
    return any(variant.signature.get(a, "").startswith("*") for a in variant.aligned)


_APPLIES = {
    "test_discovered_dot_variant_uses_matrix_instructions": lambda v: v.kind == "dot",
    "test_discovered_memory_variant_moves_128_bit_vectors":
        lambda v: v.kind == "memory" and _aligned_pointer(v),
}


def _twin_key(variant: Variant, dtype: str) -> tuple:
    signature = tuple((k, t.replace(dtype, "bf16")) for k, t in variant.signature.items())
    return (aot.kernel_name(variant.kernel), signature, tuple(sorted(variant.constexprs.items())),
            variant.num_warps, variant.num_stages)


@functools.lru_cache(maxsize=None)
def _sweep() -> tuple[tuple[int, str], ...]:
    """(variant index, arch) pairs this suite compiles.

    An fp16 variant whose bf16 twin (same kernel, config and constexprs) is listed compiles to the
    same code but for its 16-bit types and conversions: sm_90 compiles the first such twin of each
    kernel (so every kernel's fp16 build is checked) and skips the rest. Otherwise sm_90, the
    architecture the config lists are reasoned for, compiles every variant but attention's
    segment-masked ones (``SEGMENTS``): one bf16 D=128 of each kernel. sm_80 (not tuned) compiles the
    memory kernels, whose 128-bit accesses matter on both, without fp16 twins. The
    skipped pairs are left to ``python -m kernels.aot``, which compiles every pair: the dot kernels'
    builds are the slowest compiles of the suite.
    """
    variants = _discovery().variants
    bf16 = {_twin_key(v, "bf16") for v in variants}
    pairs, sampled = [], set()
    for index, variant in enumerate(variants):
        twin = "*fp16" in " ".join(variant.signature.values()) and _twin_key(variant, "fp16") in bf16
        # attention's segment-masked builds: one bf16 D=128 config per kernel (and atomic dQ switch),
        # where the registers are tightest; the full list in kernels.aot
        segments = variant.constexprs.get("SEGMENTS") is True
        if segments and not (variant.name.startswith("bf16 BLOCK_D=128 ") and not twin):
            continue
        for arch in aot.DEFAULT_ARCHS:
            if arch == "sm_80" and (variant.kind == "dot" or twin or segments):
                continue
            if arch == "sm_90" and (twin or segments):
                key = (aot.kernel_name(variant.kernel), "fp16" if twin else variant.constexprs.get("ATOMIC_DQ"))
                if key in sampled:
                    continue
                sampled.add(key)
            pairs.append((index, arch))
    return tuple(pairs)


def pytest_generate_tests(metafunc):
    if "discovered" not in metafunc.fixturenames:
        return
    applies = _APPLIES.get(metafunc.function.__name__, lambda v: True)
    cases, ids = [], []
    variants = _discovery().variants
    for index, arch in _sweep():
        variant = variants[index]
        if applies(variant):
            cases.append((index, arch))
            ids.append(f"{aot.kernel_name(variant.kernel)}[{variant.name}]-{arch}")
    assert cases, f"no variant in any aot_variants() is checked by {metafunc.function.__name__}"
    metafunc.parametrize("discovered", cases, ids=ids)


@pytest.fixture(scope="module")
def discovered_rows():
    """(variant index, arch) -> row for every pair of the sweep, compiled once per test run."""
    variants = _discovery().variants
    rows = {}
    for arch in aot.DEFAULT_ARCHS:
        indices = [i for i, a in _sweep() if a == arch]
        rows.update(zip(((i, arch) for i in indices), aot.compile_all([variants[i] for i in indices], [arch])))
    return rows


@pytest.fixture
def discovered_row(discovered, discovered_rows):
    row = discovered_rows[discovered]
    return row, _discovery().variants[discovered[0]]


def _compiled(row):
    if row["error"]:
        pytest.skip("does not compile: see test_discovered_variant_compiles")
    return row


def test_discovered_variant_compiles(discovered_row):
    row, _ = discovered_row
    assert row["error"] is None, row["error"]


def test_discovered_variant_does_not_spill(discovered_row):
    row, variant = discovered_row
    _compiled(row)
    assert row["spill_bytes"] == 0 or variant.keep_reason, aot.format_table([row])


def test_discovered_variant_shared_memory_fits(discovered_row):
    row, variant = discovered_row
    _compiled(row)
    fits = row["shared_bytes"] <= aot.ARCHS[row["arch"]].shared_per_block
    assert fits or variant.keep_reason, aot.format_table([row])


def test_discovered_dot_variant_uses_matrix_instructions(discovered_row):
    row, _ = discovered_row
    _compiled(row)
    matrix = aot.ARCHS[row["arch"]].matrix
    assert row[matrix] > 0, f"no {matrix} on {row['arch']}:\n" + aot.format_table([row])


def test_discovered_memory_variant_moves_128_bit_vectors(discovered_row):
    row, variant = discovered_row
    _compiled(row)
    assert row["vector_loads"] > 0 or row["global_loads"] == 0, aot.format_table([row])
    if variant.vector_stores:
        assert row["vector_stores"] > 0 or row["global_stores"] == 0, aot.format_table([row])


def test_every_jit_function_is_covered_by_a_variant():
    found = _discovery()
    assert found.jit_functions
    assert found.uncovered() == [], (
        "these @triton.jit functions are launched by no variant in any aot_variants(): "
        f"{found.uncovered()}")


def test_discovery_sees_the_kernel_package():
    found = _discovery()
    package = Path(aot.__file__).parents[1]
    name = aot.__package__.rpartition(".")[0]
    expected = {f"{name}.{p.stem}" for p in package.glob("*.py")} - {f"{name}.__init__"}
    assert set(found.modules) == expected
