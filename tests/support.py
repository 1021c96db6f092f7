"""Helpers shared by the test modules (importable because tests/conftest.py puts this folder on sys.path)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Sink:
    """An output stream that keeps what was written; not a terminal unless ``tty``."""

    def __init__(self, tty: bool = False):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def tiny_corpus(tmp_path_factory) -> list[str]:
    """Overrides pointing at a small JSON-lines corpus, tokenized once per test session."""
    base = tmp_path_factory.getbasetemp() / "tiny-corpus"
    corpus = base / "corpus.jsonl"
    if not corpus.exists():
        base.mkdir(exist_ok=True)
        docs = (f"def f{i}(x):\n    return x * {i} + {i % 7}  # the quick brown fox {i}\n" * 3 for i in range(200))
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [f"--data.source={corpus}", f"--data.cache_dir={base / 'cache'}"]


def visible_pairs(seqlen: int, causal: bool, window: int | None, segment_ids=None, device="cpu") -> torch.Tensor:
    """Which key j each query i sees, written out pair by pair: (S, S) booleans, or (B, 1, S, S) with
    ``segment_ids`` (B, S). The band is the kernels' (``i - window < j <= i`` causal, ``< i + window``
    otherwise); a segment sees only its own id."""
    i = torch.arange(seqlen, device=device)[:, None]
    j = torch.arange(seqlen, device=device)[None, :]
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= j > i - window
        if not causal:
            visible &= j < i + window
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return visible


def run_isolated(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python with the interpreter on and ``tritonforge`` bound to this
    checkout (as tests/conftest.py binds it), for cases that may crash the process, e.g. a kernel
    addressing memory it does not own. Returns the finished process; stdout and stderr are captured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prelude = textwrap.dedent(f"""
        import sys, types
        sys.path[:] = [p for p in sys.path if p not in ("", {root!r})]
        package = types.ModuleType("tritonforge")
        package.__path__ = [{root!r}]
        sys.modules["tritonforge"] = package
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def load_gpu_tool():
    """tools/gpu.py, the repository's GPU suite: a script outside the package, loaded from its file."""
    name = "tritonforge_tools_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "gpu.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
