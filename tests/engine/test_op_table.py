"""The op table is the one list of ops: a new row reaches the recipe's [kernels] keys, resolve() and bench ops."""
import json
from dataclasses import dataclass

import pytest
import torch

from tritonforge.engine.ops import select as op_select, table as op_table
from tritonforge.engine.bench import cases as bench_cases
from tritonforge.engine.bench import ops as bench_ops
from tritonforge.engine.config import RecipeError, dump_toml, load_recipe


@dataclass(frozen=True)
class Length:
    n: int

    @property
    def label(self) -> str:
        return str(self.n)


def torch_scale(x, alpha=2.0):
    return x * alpha


def _parse(spec: str) -> list[Length]:
    if not spec.isdigit() or int(spec) == 0:
        raise ValueError(spec)
    return [Length(int(spec))]


def _case(shape, dtype, device):
    x = torch.randn(shape.n, dtype=dtype, device=device, requires_grad=True)
    size = x.element_size() * shape.n
    return bench_cases.Case("scale", shape, dtype, device, [x], torch.randn_like(x), ("y", "dx"),
                          {"fwd": 2 * size, "bwd": 2 * size, "fwdbwd": 4 * size}, "GB/s")


def _reference(case):
    leaves = bench_cases.upcast(case)
    return bench_cases.backward_reference(case, torch_scale(leaves[0]), leaves)


SCALE = op_table.Op(
    "scale", "x * alpha (a stand-in op for this test)",
    # The "Triton" entry is a factory, as rows use where a kernel's call needs adapting.
    {"scale": (torch_scale, lambda kernels, deterministic: lambda x, alpha=2.0: x * alpha)},
    bench=bench_cases.OpBench(syntax="N, e.g. 1024", parse=_parse, shapes={"default": [Length(4096)], "tiny": [Length(33)]},
                            make_case=_case, call=lambda ops, case: ops.scale(case.inputs[0]), reference=_reference))


@pytest.fixture
def with_scale(monkeypatch):
    monkeypatch.setattr(op_table, "TABLE", op_table.TABLE + [SCALE])


def test_a_new_row_is_a_recipe_key(with_scale, tmp_path):
    r = load_recipe(None, ["--kernels.scale=torch"])
    assert r.kernels.backends()["scale"] == "torch"
    assert 'scale = "torch"' in dump_toml(r)
    (tmp_path / "r.toml").write_text(dump_toml(r))
    assert load_recipe(tmp_path / "r.toml") == r
    with pytest.raises(RecipeError, match="kernels.scale: unknown backend 'fast'"):
        load_recipe(None, ["--kernels.scale=fast"])


def test_a_new_row_is_resolved(with_scale):
    x = torch.arange(3.0)
    assert torch.equal(op_select.resolve({"scale": "torch"}).scale(x), 2 * x)
    ops = op_select.resolve({"scale": "triton"}, "cpu")  # the tests run with the interpreter on
    assert ops.backends["scale"] == "triton" and torch.equal(ops.scale(x), 2 * x)
    assert "scale=triton" in ops.describe()


def test_a_new_row_is_benchmarked(with_scale, tmp_path):
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--op", "scale", "--shapes", "33", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["backend"], r["status"]) for r in rows] == [("scale", "torch", "ok"), ("scale", "triton", "ok")]
    assert "scale" in bench_ops.bench_ops()


def test_unknown_keys_list_the_table():
    with pytest.raises(RecipeError, match="valid keys of \\[kernels\\]: attention, layer_norm, .*, deterministic"):
        load_recipe(None, ["--kernels.softmax=torch"])


def test_the_table_is_the_one_op_list():
    names = op_table.op_names()
    assert len(set(names)) == len(names)
    assert tuple(load_recipe(None).kernels.backends()) == names
    assert bench_ops.bench_ops() == names
    for op in op_table.TABLE:  # every built-in op has a Triton kernel in this build
        assert op_table.triton_available(op.name), op.name
