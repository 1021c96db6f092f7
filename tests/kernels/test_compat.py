"""The Triton-version shim: version parsing, per-version tables, and the ``triton`` APIs the package
reaches through it. CI runs this file with the oldest supported Triton as well as the default one."""
import os

import pytest
import triton
import triton.language as tl

from tritonforge.kernels import _compat

TABLE = {(3, 6): "from 3.6", (3, 9): "from 3.9"}


@triton.jit
def _store_one(x_ptr):
    tl.store(x_ptr, 1.0)


@pytest.mark.parametrize("text, expected", [
    ("3.6.0", (3, 6, 0)), ("3.7.1+git5f3a2b", (3, 7, 1)), ("3.9.0rc1", (3, 9, 0)), ("3.10", (3, 10, 0)),
])
def test_parse_version(text, expected):
    assert _compat.parse_version(text) == expected


def test_parse_version_rejects_what_is_no_version():
    with pytest.raises(ValueError, match="'nightly'"):
        _compat.parse_version("nightly")


@pytest.mark.parametrize("version, expected", [
    ((3, 6, 0), "from 3.6"), ((3, 8, 2), "from 3.6"), ((3, 9, 0), "from 3.9"),
    ((3, 10, 1), "from 3.9"), ((4, 0, 0), "from 3.9"),
])
def test_by_version_takes_the_newest_entry_not_above_the_version(version, expected):
    assert _compat.by_version("t", TABLE, version) == expected


def test_by_version_below_the_oldest_entry_raises_naming_table_and_version():
    with pytest.raises(ValueError, match=r"attention: no entry for Triton 3\.5\.9"):
        _compat.by_version("attention", TABLE, (3, 5, 9))


def test_the_installed_triton_is_in_the_supported_range():
    assert _compat.TRITON_VERSION == _compat.parse_version(triton.__version__)
    assert _compat.MIN_TRITON <= _compat.TRITON_VERSION[:2]


def test_describe_names_the_version_and_the_tables_that_applied(monkeypatch):
    monkeypatch.setattr(_compat, "_applied", {})
    assert _compat.describe().startswith(f"triton {triton.__version__} (supported 3.6 to 3.9)")
    assert "per-version" not in _compat.describe()
    _compat.by_version("attention", {(3, 0): 1})
    _compat.by_version("ignored: not the installed version", {(3, 0): 1}, (3, 0, 0))
    assert _compat.describe().endswith("; per-version configs: attention from 3.0")


def test_jit_types_recognize_the_kernels_of_this_process():
    assert isinstance(_store_one, _compat.jit_types())
    assert not isinstance(_store_one.fn, _compat.jit_types())


def test_compiler_knobs_hold_only_inside_the_scope():
    from triton import knobs
    before = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    with _compat.compiler_knobs(force=True):
        assert knobs.nvidia.dump_ptxas_log and knobs.compilation.always_compile
    with _compat.compiler_knobs(force=False):
        assert knobs.nvidia.dump_ptxas_log and knobs.compilation.always_compile == before[1]
    assert (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile) == before


def test_tool_path_and_cache_dir(tmp_path, monkeypatch):
    assert os.access(_compat.tool_path("cuobjdump"), os.X_OK)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert _compat.cache_dir() == str(tmp_path)
