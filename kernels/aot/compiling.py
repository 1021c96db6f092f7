"""Compiling variants: one in this process, or many on a pool of compiler worker processes."""
from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .._compat import compiler_knobs
from ..variant import KINDS, Variant
from .analysis import analyze, judge, load_analysis, store_analysis
from .archs import ARCHS, check_archs, keep_reason_on, occupancy
from .discovery import is_jit, kernel_name, unwrap


_ALIGN_ATTR = [["tt.divisibility", 16]]


def _ast_source(kernel: Any, variant: Variant):
    """Triton's ``ASTSource`` for a variant: full signature, constants and alignment attributes.

    Triton 3.9 keys attributes by argument path, ``{(index,): [["tt.divisibility", 16]]}``, as its
    launcher does for a pointer whose address (or an integer whose value) is a multiple of 16.
    """
    from triton.compiler import ASTSource
    where = f"{kernel_name(kernel)} [{variant.name}]"
    names = list(kernel.arg_names)
    unknown = sorted((set(variant.signature) | set(variant.constexprs) | set(variant.aligned))
                     - set(names))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not arguments of the kernel ({names})")
    doubled = sorted(set(variant.signature) & set(variant.constexprs))
    if doubled:
        raise ValueError(f"{where}: {doubled} are in both signature and constexprs")
    signature, constexprs = {}, {}
    for param in kernel.params:
        if param.name in variant.constexprs:
            signature[param.name] = "constexpr"
            constexprs[param.name] = variant.constexprs[param.name]
        elif param.is_constexpr and param.has_default:
            signature[param.name] = "constexpr"
            constexprs[param.name] = param.default
        elif param.is_constexpr:
            raise ValueError(f"{where}: constexpr {param.name!r} missing from constexprs")
        elif param.name in variant.signature:
            signature[param.name] = variant.signature[param.name]
        else:
            raise ValueError(f"{where}: argument {param.name!r} missing from signature")
    attrs = {}
    for name in variant.aligned:
        if name in constexprs:
            continue
        if not (signature[name].startswith("*") or signature[name][:1] in "iu"):
            raise ValueError(f"{where}: aligned names {name!r} of type {signature[name]}; "
                             "only pointers and integers can be")
        attrs[(names.index(name),)] = _ALIGN_ATTR
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _compile(src, arch: str, variant: Variant, force: bool):
    """``triton.compile`` with ptxas's log captured; ``force`` bypasses Triton's cache."""
    import triton
    from triton.backends.compiler import GPUTarget
    log = io.StringIO()
    with compiler_knobs(force), contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch].capability, 32),
                                  options={"num_warps": variant.num_warps,
                                           "num_stages": variant.num_stages})
    return compiled, log.getvalue()


def variant_fields(variant: Variant) -> dict[str, Any]:
    return {k: getattr(variant, k) for k in Variant.__dataclass_fields__ if k != "kernel"}


def row_identity(kernel: str, fields: dict[str, Any], arch: str) -> dict[str, Any]:
    """The columns that name a row, known before (or without) compiling."""
    return {"kernel": kernel, "variant": fields["name"], "arch": arch, "kind": fields["kind"],
            "num_warps": fields["num_warps"], "num_stages": fields["num_stages"],
            "aligned": list(fields["aligned"]),
            "keep_reason": keep_reason_on(fields["keep_reason"], tuple(fields["keep_archs"]), arch)}


def compile_variant(variant: Variant, arch: str) -> dict[str, Any]:
    """Compile one variant for ``arch`` (``"sm_90"`` or ``"sm_80"``) and return its report row.

    Raises the compiler's exception if it does not compile. Under the interpreter the kernel is
    not compilable in this process, so the work goes to a worker process.
    """
    check_archs([arch])
    if variant.kind not in KINDS:
        raise ValueError(f"{kernel_name(variant.kernel)} [{variant.name}]: kind must be one of "
                         f"{KINDS}, got {variant.kind!r}")
    kernel = unwrap(variant.kernel)
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        row = compile_all([variant], [arch], jobs=1)[0]
        if row["error"]:
            raise RuntimeError(row["error"])
        return row
    start = time.perf_counter()
    src = _ast_source(kernel, variant)
    compiled, log = _compile(src, arch, variant, force=False)
    cached = not log
    analysis = load_analysis(compiled.hash)
    if analysis is None:
        if cached:
            # Triton's cache holds the kernel but not our analysis: compile again so that ptxas runs
            # and its log, and a cubin made in this process, are what we read.
            compiled, log = _compile(src, arch, variant, force=True)
            cached = False
        analysis = analyze(compiled, log)
        analysis["cold_compile_s"] = round(time.perf_counter() - start, 3)
        store_analysis(compiled.hash, analysis)
    row = {**row_identity(kernel_name(kernel), variant_fields(variant), arch), **analysis}
    row.update(occupancy(row["registers"], row["shared_bytes"], variant.num_warps, arch))
    row.update(judge(row, variant))
    row.update(compile_s=round(time.perf_counter() - start, 3), cached=cached, error=None)
    return row


_JOB_TIMEOUT_S = 600


def _this_module_name() -> str:
    spec = globals().get("__spec__")
    return spec.name if spec is not None else __name__


def _import_root() -> str:
    """The directory from which this module is importable under its dotted name."""
    return str(Path(__file__).resolve().parents[_this_module_name().count(".")])


def _worker_boot() -> str:
    """The code a fresh compiler process starts with: import this module by its dotted name and serve.

    A top-level package that this process bound by hand rather than found on ``sys.path`` (the test suite
    binds ``tritonforge`` to the checkout it lives in) is bound the same way there first, so the worker
    imports the kernels, and any module a job names, exactly as this process does."""
    name = _this_module_name()
    top = name.split(".")[0]
    package = sys.modules.get(top)
    lines = ["import sys", f"sys.path.insert(0, {_import_root()!r})"]
    paths = list(getattr(package, "__path__", None) or [])
    if package is not None and getattr(package, "__spec__", None) is None and paths:
        lines += ["import types", f"_p = types.ModuleType({top!r})", f"_p.__path__ = {paths!r}",
                  f"sys.modules[{top!r}] = _p"]
    lines.append(f"from {name} import serve")
    lines.append("serve()")
    return "; ".join(lines)


def _job(variant: Variant, arch: str) -> bytes:
    raw = unwrap(variant.kernel).fn
    payload = {"module": raw.__module__, "file": inspect.getfile(raw), "function": raw.__name__,
               "fields": variant_fields(variant), "arch": arch}
    return base64.b64encode(pickle.dumps(payload)) + b"\n"


def _import_source_module(name: str, file: str) -> Any:
    """The module ``name`` if it is the one defined in ``file``; else ``file`` loaded on its own."""
    with contextlib.suppress(ImportError, OSError):
        module = importlib.import_module(name)
        if os.path.samefile(getattr(module, "__file__", "") or os.devnull, file):
            return module
    alias = f"_aot_source_{abs(hash(file)):x}"
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(alias, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    return sys.modules[alias]


def _rebuild(payload: dict[str, Any]) -> Variant:
    module = _import_source_module(payload["module"], payload["file"])
    kernel = unwrap(getattr(module, payload["function"], None))
    if not is_jit(kernel):
        raise ValueError(f"{payload['module']}.{payload['function']} is not a module-level "
                         "@triton.jit function")
    return Variant(kernel=kernel, **payload["fields"])


def error_row(identity: dict[str, Any], message: str) -> dict[str, Any]:
    return {**identity, "error": message[-4000:], "ok": False, "over_budget": [],
            "problems": ["does not compile"], "notes": []}


def serve() -> None:
    """Worker loop: one base64 pickled job per stdin line, one JSON row per reply line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the compiler prints must not land in the reply channel
    for line in sys.stdin.buffer:
        payload = pickle.loads(base64.b64decode(line))
        identity = row_identity(f"{payload['module'].rpartition('.')[2]}.{payload['function']}",
                             payload["fields"], payload["arch"])
        try:
            row = compile_variant(_rebuild(payload), payload["arch"])
        except Exception as exc:  # the row records the failure; the worker goes on
            row = error_row(identity, f"{type(exc).__name__}: {exc}")
        replies.write(json.dumps(row) + "\n")
        replies.flush()


class _Worker:
    """One compiler process with ``TRITON_INTERPRET=0``, fed one job at a time."""

    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="0")
        # Triton 3.9 warns once per process that fp fusion defaults to on; state the default.
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        boot = _worker_boot()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)

    def run(self, job: bytes, timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(job)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no result after {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"compiler process exited ({self.proc.wait()}):\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def compile_all(variants: Sequence[Variant], archs: Sequence[str], jobs: int | None = None,
                timeout: float = _JOB_TIMEOUT_S) -> list[dict[str, Any]]:
    """Compile every variant for every arch on a pool of worker processes.

    Rows come back in variant order, then arch order; a variant that does not compile yields a
    row with ``error`` set instead of raising.
    """
    archs = check_archs(archs)
    work = [(i, v, a) for i, v in enumerate(variants) for a in archs]
    if not work:
        return []
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    todo: queue.Queue = queue.Queue()
    # Dot kernels take longest: start them first so that the pool finishes together.
    for item in sorted(work, key=lambda w: (w[1].kind != "dot", w[0])):
        todo.put(item)

    def drain() -> None:
        worker = None
        try:
            while True:
                try:
                    i, variant, arch = todo.get_nowait()
                except queue.Empty:
                    return
                identity = row_identity(kernel_name(variant.kernel), variant_fields(variant), arch)
                try:
                    job = _job(variant, arch)
                except Exception as exc:
                    rows[i, arch] = error_row(identity, f"cannot send to a worker: {exc!r}")
                    continue
                try:
                    worker = worker or _Worker()
                    rows[i, arch] = worker.run(job, timeout)
                except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                    rows[i, arch] = error_row(identity, f"{type(exc).__name__}: {exc}")
                    if worker is not None:
                        worker.proc.kill()
                        worker.close()
                        worker = None
        finally:
            if worker is not None:
                worker.close()

    n_workers = max(1, min(jobs or available_cores(), len(work)))
    threads = [threading.Thread(target=drain, daemon=True) for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [rows[i, a] for i, _, a in work]
