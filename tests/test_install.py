"""The project as a user installs it: a wheel in a fresh environment, beside Hugging Face's ``kernels``.

Installed, the repository's ``engine/`` and ``kernels/`` are ``tritonforge.engine`` and
``tritonforge.kernels``: no top-level name that another distribution owns. Hugging Face's ``kernels``
installs a top-level ``kernels``; here both are installed into one fresh environment in either order,
both import, ``transformers`` finds the real one, and the installed ``tritonforge`` command trains a few
steps on the Triton kernels (through the interpreter).

The fresh environments reuse this environment's packages (torch, triton, transformers, ...) through a
``.pth`` line, so nothing large is installed twice; what they install themselves, from local wheels, is
this project and Hugging Face's ``kernels``.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tritonforge.engine.ops import table as op_table
from support import tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
HF_KERNELS = "kernels"  # Hugging Face's distribution; its import name is the same
pytestmark = pytest.mark.slow

PROBE = r"""
import importlib.metadata, json, sys
import kernels, tritonforge.engine, tritonforge.kernels
from tritonforge.engine.ops import table as op_table
import transformers.integrations.hub_kernels as hub
print(json.dumps({
    "hf_kernels_file": kernels.__file__,
    "hf_kernels_has_get_kernel": hasattr(kernels, "get_kernel"),
    "transformers_uses_hf_kernels": hub.get_kernel_hub is kernels.get_kernel,
    "engine_file": tritonforge.engine.__file__,
    "kernels_package": op_table.KERNELS_PACKAGE,
    "triton_available": all(op_table.triton_available(op) for op in op_table.op_names()),
    "top_level": sorted(importlib.metadata.distribution("tritonforge").read_text("top_level.txt").split()),
}))
"""


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """This project's wheel, built from the checkout, and Hugging Face's ``kernels`` wheel."""
    pytest.importorskip("transformers")
    try:
        hf_version = __import__("importlib.metadata").metadata.version(HF_KERNELS)
    except Exception:  # noqa: BLE001 - the test extra installs it; without it there is nothing to collide with
        pytest.skip("Hugging Face's kernels is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", out, str(ROOT)])
    _run([*pip, "download", "--no-deps", "-d", out, f"{HF_KERNELS}=={hf_version}"])
    ours = next(out.glob("tritonforge-*.whl"))
    theirs = next(p for p in out.glob("*.whl") if p != ours)
    return ours, theirs


def _fresh_env(path: Path) -> Path:
    """A new virtual environment that sees this one's packages after its own."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "_outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("order", ["tritonforge-first", "hf-kernels-first"])
def test_installs_beside_hugging_face_kernels_and_trains_on_its_triton_kernels(wheels, tmp_path, tmp_path_factory,
                                                                              order):
    ours, theirs = wheels
    python = _fresh_env(tmp_path / "env")
    for wheel in ([ours, theirs] if order == "tritonforge-first" else [theirs, ours]):
        # pip of this environment, installing into the fresh one's prefix: the fresh one has no pip of its own
        _run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "-q",
              "install", "--no-deps", "--ignore-installed", str(wheel)])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    work = tmp_path / "elsewhere"  # not the checkout: only the installed files can be imported
    work.mkdir()
    found = json.loads(_run([str(python), "-c", PROBE], cwd=work, env=env))
    site = str(tmp_path / "env")
    assert found["hf_kernels_file"].startswith(site) and found["hf_kernels_has_get_kernel"], found
    assert found["transformers_uses_hf_kernels"], found
    assert found["engine_file"].startswith(site) and found["kernels_package"] == "tritonforge.kernels", found
    assert found["triton_available"] and found["top_level"] == ["tritonforge"], found

    run_dir = tmp_path / "run"
    _run([str(tmp_path / "env" / "bin" / "tritonforge"), "train", str(ROOT / "recipes" / "gpt_cpu.toml"),
          "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=16",
          "--train.seq_len=16", "--train.batch_size=2", "--train.steps=3", "--train.time_budget=",
          "--train.eval_every=0", "--train.eval_batches=1", "--train.final_eval_tokens=0",
          "--train.sample_tokens=0", "--train.log_every=1", *tiny_corpus(tmp_path_factory),
          "--optim.name=adamw", "--run.threads=1", f"--run.dir={run_dir}",
          *(f"--kernels.{op}=triton" for op in op_table.op_names())],
         cwd=work, env=env)
    env_json = json.loads((run_dir / "env.json").read_text())
    assert set(env_json["kernels"].values()) == {"triton"}, env_json["kernels"]
