"""The one command for a GPU machine: kernel check, GPU tests, op benchmarks, a training benchmark, one summary.

    python tools/gpu.py [--anchors DIR] [--out DIR] [--only STAGES] [--ops OPS] [--recipe TOML]
                               [--steps N] [--compile] [--budget S]

Run from the repository root of a plain checkout: nothing to install, and neither ``datasets`` nor
``wandb`` is needed. The stages run one after another, each in its own process (a kernel that faults
cannot take the others down) with ``TRITON_INTERPRET=0`` and a time limit:

1. ``check``: ``tritonforge kernels check`` (every op's kernels against an upcast reference at small, odd
   and real shapes in bf16, fp16 and fp32; its table goes to ``check.log`` and ``check.json``). If a row
   FAILS, the kernel benchmarks (``ops``, ``train``) are not run: timing a kernel that computes wrong
   results proves nothing. The summary lists the failing rows.
2. ``tests``: ``pytest -m gpu`` (the tests that need CUDA).
3. ``tune``: ``tritonforge kernels tune --synthetic`` on the anchor recipes (:data:`TUNE_RECIPES`: GPT-2 124M
   and ConvNeXt-T): which backend a training run's ``auto`` picks per op on this card, and why. Each recipe
   measures afresh (the cache is rewritten) within ``--kernels.tune_seconds=60``.
4. ``ops``: ``tritonforge bench ops`` at the default shapes in bf16 with every backend (``--ops`` narrows
   the ops), FlexAttention at S = 4096 only (it compiles per shape), and packed documents
   (:data:`DOCUMENT_SHAPES`: the Triton kernel, the torch backend and FlexAttention with a document mask);
   do_bench with 10 ms warm-up and 40 ms of repetitions per timing.
5. ``train``: ``tritonforge bench train recipes/gpt2_124m.toml --kernels triton --vs torch`` for
   ``--steps`` steps (default 20) at the nanoGPT shape (batch 16 x 1024 tokens, one micro-batch per step,
   bf16, fused AdamW, clipping at 1.0) on random GPT-2 tokens; ``--compile`` adds torch.compile runs;
   ``--recipe recipes/convnext_tiny.toml`` benchmarks ConvNeXt-T instead.
6. ``anchors``: the peers' scripts ``anchors_kernels.py`` and ``anchors_train.py`` from ``--anchors DIR``,
   when given, so that their figures are measured in the same call as the project's.

It ends with ONE summary table (per op and shape: the triton, torch and best peer rates, the
triton/torch speed-up; the training throughputs; the test counts) and writes ``summary.json``,
``summary.csv``, each stage's JSON/CSV and log under ``$OUT`` if set, else ``./bench-results/``.
The exit status is 1 if any stage failed, timed out or reported a FAILED row.

Each stage has its own time limit, and ``--budget`` (default 570 s) caps them together: a stage that would
start with too little time left is reported "not run", so the summary is always printed within a 10-minute
call. docs/benchmarks.md gives the stages' expected durations.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: The engine package as ``python -m`` names it from the repository root.
ENGINE = "engine"

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "tests", "tune", "ops", "train", "anchors")
#: Seconds each stage may run before it is stopped (its partial results are still summarized); --budget caps
#: them all together.
TIME_LIMITS = {"check": 210, "tests": 240, "tune": 90, "ops": 330, "flex": 150, "documents": 120, "train": 180,
               "anchors": 330}
#: A stage is not started with less time than this left in the budget.
MIN_STAGE_S = 20
ANCHOR_SCRIPTS = ("anchors_kernels.py", "anchors_train.py")
#: Every backend but FlexAttention, which runs in its own pass at S = 4096 only.
OPS_BACKENDS = ("torch,triton,triton-nondet,sdpa-flash,sdpa-cudnn,sdpa-mem_eff,compile,liger,torch-fused,"
                "torch-foreach,torch-chunked")
FLEX_SHAPES = "4x32x4096x64,4x16x4096x128"
#: Packed documents, timed in a pass of their own with the Triton kernel, the torch backend (FlexAttention
#: with its block mask on CUDA) and FlexAttention with ``create_block_mask``'s document mask.
DOCUMENT_SHAPES = "4x16x4096x128:causal:segments=8,1x16x16384x128:causal:segments=32"
TRAIN_RECIPE = "recipes/gpt2_124m.toml"
#: The recipes whose tuned choices the ``tune`` stage reports.
TUNE_RECIPES = ("recipes/gpt2_124m.toml", "recipes/convnext_tiny.toml")
TIMING = ["--warmup-ms", "10", "--rep-ms", "40"]


def bench_names(module: str, *names: str) -> tuple:
    """Names from a module of the engine's bench package: of the engine already imported (``tritonforge.engine``
    where the test suite loads this file), else of the checkout's ``engine``, imported from :data:`ROOT`."""
    package = "tritonforge.engine" if "tritonforge.engine" in sys.modules else ENGINE
    if package == ENGINE and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    found = importlib.import_module(f"{package}.bench.{module}")
    return tuple(getattr(found, name) for name in names)


@dataclass
class StageResult:
    name: str
    status: str = "skipped"  # ok | FAILED | timed out | not run (budget spent) | skipped (not asked for)
    seconds: float = 0.0
    note: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    #: The last lines the stage printed (not written to the JSON).
    tail: list[str] = field(default_factory=list, repr=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_logged(cmd: list[str], log_path: Path, limit_s: float) -> tuple[int | None, float, list[str]]:
    """Run ``cmd`` in its own process group, echoing and logging its output; stop it after ``limit_s``.

    Returns (exit status or None when stopped, seconds, the last lines of output).
    """
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    stopped = threading.Event()
    tail: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def stop():
            stopped.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group (compile workers too)
            except ProcessLookupError:
                pass

        timer = threading.Timer(limit_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
                tail = (tail + [line.rstrip("\n")])[-40:]
            proc.wait()
        finally:
            timer.cancel()
    seconds = time.perf_counter() - start
    return (None if stopped.is_set() else proc.returncode), seconds, tail


class Budget:
    """Wall-clock seconds left for the whole command, so that the summary is always printed."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def allow(self, wanted: float) -> float:
        return min(wanted, self.deadline - time.monotonic())


def _stage(name: str, cmd: list[str], out: Path, limit_s: float, budget: Budget, ok_codes=(0,)) -> StageResult:
    limit_s = budget.allow(limit_s)
    if limit_s < MIN_STAGE_S:
        return StageResult(name, "not run", note="no time left in --budget")
    code, seconds, tail = run_logged(cmd, out / f"{name}.log", limit_s)
    result = StageResult(name, seconds=seconds, outputs={"log": str(out / f"{name}.log")}, tail=tail)
    if code is None:
        result.status, result.note = "timed out", f"stopped after {limit_s:.0f} s"
    elif code in ok_codes:
        result.status = "ok"
    else:
        result.status, result.note = "FAILED", f"exit status {code}"
    return result


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

def stage_check(out: Path, budget: Budget) -> StageResult:
    cmd = [sys.executable, "-m", ENGINE, "kernels", "check", "--json", str(out / "check.json")]
    result = _stage("check", cmd, out, TIME_LIMITS["check"], budget)
    result.outputs["json"] = str(out / "check.json")
    statuses = [r.get("status") for r in _load(out / "check.json").get("rows", [])]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    result.note = "; ".join(filter(None, [f"{len(statuses)} rows ({counts})" if statuses else "", result.note]))
    return result


def check_failed(check: StageResult | None) -> bool:
    """Whether the kernel check found a wrong kernel (a FAIL row, or its exit status 1)."""
    return check is not None and check.status == "FAILED"


def stage_tests(out: Path, budget: Budget) -> StageResult:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    result = _stage("tests", cmd, out, TIME_LIMITS["tests"], budget, ok_codes=(0, 5))  # 5: no test is marked gpu
    counts = parse_pytest_counts("\n".join(result.tail))
    result.note = ", ".join(f"{n} {k}" for k, n in counts.items()) or result.note or "no summary line"
    if result.status != "ok" and counts:
        result.note += f" ({result.status})"
    return result


def parse_pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": 12, "failed": 1, ...}`` from pytest's last summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    if not lines:
        return {}
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                                    lines[-1])}


def _plot_args(out: Path, name: str) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return ["--plot", str(out / f"{name}.png")]


def backends_for(ops: str) -> str:
    """The part of :data:`OPS_BACKENDS` that serves at least one of ``ops`` (a comma list or "all"):
    ``bench ops`` rejects a backend that none of its ops has."""
    backends_of, bench_ops = bench_names("catalogue", "backends_of", "bench_ops")
    chosen = bench_ops() if ops == "all" else ops.split(",")
    known = {b for op in chosen for b in backends_of(op)}
    return ",".join(b for b in OPS_BACKENDS.split(",") if b in known)


def stage_ops(out: Path, budget: Budget, ops: str = "all") -> StageResult:
    bench = [sys.executable, "-m", ENGINE, "bench", "ops"]
    main = _stage("ops", bench + ["--op", ops, "--backends", backends_for(ops), "--json", str(out / "ops.json"),
                                  "--csv", str(out / "ops.csv")] + TIMING + _plot_args(out, "ops"),
                  out, TIME_LIMITS["ops"], budget)
    if ops != "all" and "attention" not in ops.split(","):
        main.outputs["json"] = str(out / "ops.json")
        return main
    flex = _stage("ops_flex", bench + ["--op", "attention", "--backends", "torch,flex", "--shapes", FLEX_SHAPES,
                                       "--json", str(out / "ops_flex.json"), "--csv", str(out / "ops_flex.csv")]
                  + TIMING, out, TIME_LIMITS["flex"], budget)
    documents = _stage("ops_documents", bench + ["--op", "attention", "--backends", "torch,triton,flex",
                                                 "--shapes", DOCUMENT_SHAPES, "--json", str(out / "ops_documents.json"),
                                                 "--csv", str(out / "ops_documents.csv")] + TIMING,
                       out, TIME_LIMITS["documents"], budget)
    main.outputs.update(json=str(out / "ops.json"), flex_json=str(out / "ops_flex.json"),
                        documents_json=str(out / "ops_documents.json"))
    for name, extra in (("flex", flex), ("documents", documents)):
        main.seconds += extra.seconds
        if extra.status != "ok":
            main.note = "; ".join(filter(None, [main.note, f"{name} pass {extra.status} {extra.note}".strip()]))
            if main.status == "ok":
                main.status = extra.status
    return main


def stage_tune(out: Path, budget: Budget) -> StageResult:
    """``kernels tune --synthetic`` on each of :data:`TUNE_RECIPES`, one process (and time limit) each."""
    result = StageResult("tune", status="ok")
    for recipe in TUNE_RECIPES:
        name = Path(recipe).stem
        cmd = [sys.executable, "-m", ENGINE, "kernels", "tune", recipe, "--synthetic", "--kernels.tune_seconds=60",
               "--json", str(out / f"tune_{name}.json")]
        r = _stage(f"tune_{name}", cmd, out, TIME_LIMITS["tune"], budget)
        result.seconds += r.seconds
        result.outputs[name] = str(out / f"tune_{name}.json")
        if r.status != "ok":
            result.status = r.status
            result.note = "; ".join(filter(None, [result.note, f"{name} {r.status} {r.note}".strip()]))
    return result


def stage_train(out: Path, steps: int, compile_too: bool, budget: Budget, recipe: str = TRAIN_RECIPE) -> StageResult:
    cmd = [sys.executable, "-m", ENGINE, "bench", "train", recipe, "--kernels", "triton", "--vs", "torch",
           "--steps", str(steps), "--train.grad_accum=1", "--json", str(out / "train.json"),
           "--csv", str(out / "train.csv")] + (["--compile"] if compile_too else [])
    result = _stage("train", cmd, out, TIME_LIMITS["train"] + (180 if compile_too else 0), budget)
    result.outputs["json"] = str(out / "train.json")
    return result


def stage_anchors(out: Path, folder: Path, budget: Budget) -> StageResult:
    result = StageResult("anchors", status="ok")
    notes = []
    for script in ANCHOR_SCRIPTS:
        path = folder / script
        if not path.is_file():
            notes.append(f"{script} not found")
            continue
        r = _stage(Path(script).stem, [sys.executable, str(path)], out, TIME_LIMITS["anchors"], budget)
        result.seconds += r.seconds
        notes.append(f"{script} {r.status}")
        if r.status != "ok":
            result.status = r.status
    result.note = ", ".join(notes)
    return result


# ---------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------

def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rate(row: dict | None) -> str:
    if row is None:
        return "–"
    if row.get("status") != "ok" or row.get("fwdbwd_rate") is None:
        return row.get("status", "–")
    pct = f" ({row['pct_peak']:.0f}%)" if row.get("pct_peak") is not None else ""
    return f"{row['fwdbwd_rate']:.4g}{pct}"


def ops_summary(ops_rows: list[dict], flex_rows: list[dict], document_rows: Sequence[dict] = ()) -> list[dict]:
    """One summary line per (op, shape, dtype): triton, torch and the best peer's fwd+bwd rates. The flex
    pass adds its flex rows (its torch rows repeat the main pass's); the documents pass all of its rows."""
    rows = ops_rows + [r for r in flex_rows if r["backend"] == "flex"] + list(document_rows)
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), {}).setdefault(r["backend"], r)
    lines = []
    for (op, shape, dtype), by_backend in groups.items():
        triton, torch_row = by_backend.get("triton"), by_backend.get("torch")
        peers = [r for b, r in by_backend.items() if b not in ("triton", "torch") and r.get("status") == "ok"
                 and r.get("fwdbwd_rate")]
        best = max(peers, key=lambda r: r["fwdbwd_rate"], default=None)
        failed = [b for b, r in by_backend.items() if r.get("status") == "FAILED"]
        unit = next((r["unit"] for r in by_backend.values() if r.get("unit")), "")
        lines.append({
            "item": f"{op} {shape} {dtype}", "unit": unit, "triton": _rate(triton), "torch": _rate(torch_row),
            "best_peer": f"{best['backend']} {_rate(best)}" if best else "–",
            "triton_vs_torch": f"{triton['vs_torch']:.2f}" if triton and triton.get("vs_torch") else "–",
            "note": f"FAILED: {', '.join(failed)}" if failed else "",
        })
    return lines


#: The peers' training figure for a recipe's model: (anchors_train.json key prefix, label), by model
#: preset (or arch for the GPT).
TRAIN_ANCHORS = {"gpt": ("gpt124m", "nanoGPT-style SDPA"), "convnext-tiny": ("convnext_tiny", "torchvision"),
                 "resnet50": ("resnet50", "torchvision")}


def train_summary(train: dict, anchors_train: dict) -> list[dict]:
    rows = train.get("rows", [])
    recipe = train.get("recipe", {})
    name = recipe.get("run", {}).get("name", "recipe")
    model = recipe.get("model", {})
    prefix, peer = TRAIN_ANCHORS.get("gpt" if model.get("arch", "gpt") == "gpt" else model.get("preset", ""),
                                     (None, ""))
    unit = next((f"{r['unit']}/s" for r in rows if r.get("unit")), "tok/s")
    lines = []
    for mode in ("eager", "compile"):
        by = {r["kernels"]: r for r in rows if r.get("mode") == mode}
        if not by:
            continue
        triton, torch_row = by.get("triton"), by.get("torch")

        def rate(r):
            if r is None:
                return "–"
            if r.get("items_per_s") is None:
                return r.get("status", "–")
            return f"{r['items_per_s']:,.0f} ({r['mfu']:.0f}% MFU)" if r.get("mfu") else f"{r['items_per_s']:,.0f}"

        anchor = anchors_train.get(f"{prefix}.{mode}.{unit.replace('/', '_per_')}") if prefix else None
        failed = [r["kernels"] for r in by.values() if r.get("status") == "FAILED"]
        lines.append({
            "item": f"train {name} {mode}", "unit": unit, "triton": rate(triton), "torch": rate(torch_row),
            "best_peer": f"{peer} {anchor:,.0f}" if anchor else "–",
            "triton_vs_torch": f"{triton['vs']:.2f}" if triton and triton.get("vs") else "–",
            "note": f"FAILED: {', '.join(failed)}" if failed else "",
        })
    # The CNN target: eager with the Triton kernels against torch.compile of the torch model, same run.
    eager = next((r for r in rows if r.get("mode") == "eager" and r.get("kernels") == "triton"), None)
    compiled = next((r for r in rows if r.get("mode") == "compile" and r.get("kernels") == "torch"), None)
    if eager and compiled and eager.get("items_per_s") and compiled.get("items_per_s"):
        ratio = eager["items_per_s"] / compiled["items_per_s"]
        lines.append({
            "item": f"train {name}: triton eager vs torch compile", "unit": unit,
            "triton": f"{eager['items_per_s']:,.0f}", "torch": f"{compiled['items_per_s']:,.0f} (compile)",
            "best_peer": "–", "triton_vs_torch": f"{ratio:.2f}",
            "note": "at or above torch.compile" if ratio >= 1.0 else "below torch.compile",
        })
    return lines


def tune_summary(tunings: dict[str, dict]) -> list[dict]:
    """One summary line per (recipe, op) the tune stage decided: the choice, each candidate's ms per
    micro-batch, why."""
    lines = []
    for name, payload in tunings.items():
        for op, d in payload.get("tuning", {}).items():
            times = ", ".join(f"{c} {v['ms']:.3g}" if v.get("ms") is not None else f"{c} {v.get('status')}"
                              for c, v in d.get("candidates", {}).items())
            lines.append({"item": f"tune {name} {op}", "unit": "ms/micro-batch", "triton": d["choice"],
                          "torch": times, "best_peer": "", "triton_vs_torch": "", "note": d.get("why", "")})
    return lines


def check_summary(check_rows: list[dict]) -> list[dict]:
    """One summary line per FAIL row of the kernel check (the passing rows are in check.json)."""
    return [{"item": f"check {r['op']} {r['backend']} {r['shape']} {r['dtype']}", "unit": "rel. error",
             "triton": "FAIL", "torch": "", "best_peer": "", "triton_vs_torch": "",
             "note": f"FAILED: {r.get('note', '')} (tolerance {r.get('tolerance')})"}
            for r in check_rows if r.get("status") == "FAIL"]


SUMMARY_COLUMNS = ("item", "unit", "triton", "torch", "best_peer", "triton_vs_torch", "note")


def summarize(out: Path, stages: list[StageResult]) -> tuple[str, dict]:
    """The summary table (text) and its JSON payload, from what the stages wrote under ``out``."""
    format_table, = bench_names("tables", "format_table")
    ops, flex, train = _load(out / "ops.json"), _load(out / "ops_flex.json"), _load(out / "train.json")
    documents = _load(out / "ops_documents.json")
    check = _load(out / "check.json")
    anchors_train = _load(out / "anchors_train.json")
    lines = [{"item": f"stage {s.name}", "unit": "", "triton": s.status, "torch": "", "best_peer": "",
              "triton_vs_torch": "", "note": f"{s.seconds:.0f} s{'; ' + s.note if s.note else ''}"}
             for s in stages if s.status != "skipped"]
    lines += check_summary(check.get("rows", []))
    lines += tune_summary({Path(r).stem: _load(out / f"tune_{Path(r).stem}.json") for r in TUNE_RECIPES})
    lines += ops_summary(ops.get("rows", []), flex.get("rows", []), documents.get("rows", []))
    lines += train_summary(train, anchors_train)
    env = ops.get("env") or train.get("env") or check.get("env") or {}
    ceilings = ops.get("ceilings") or train.get("ceilings") or {}
    head = [f"== summary: {env.get('gpu', 'GPU not recorded')} | torch {env.get('torch', '?')} | "
            f"triton {env.get('triton', '?')} =="]
    if ceilings:
        head.append(f"measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
                    f"device copy {ceilings['copy_gbps']:.0f} GB/s; rates are fwd+bwd (optimizer: one step), "
                    f"(% of that ceiling)")
    header = ["item", "unit", "triton", "torch", "best peer", "triton/torch", "note"]
    text = "\n".join(head + [format_table(header, [[line[c] for c in SUMMARY_COLUMNS] for line in lines])])
    stage_records = [{k: v for k, v in vars(s).items() if k != "tail"} for s in stages]
    return text, {"env": env, "ceilings": ceilings, "stages": stage_records, "summary": lines}


def failed_anywhere(stages: list[StageResult], payload: dict) -> bool:
    return any(s.status not in ("ok", "skipped") for s in stages) or any(
        line["note"].startswith("FAILED") for line in payload["summary"])


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ArgumentParser, BenchError = bench_names("args", "ArgumentParser", "BenchError")
    p = ArgumentParser(prog="python tools/gpu.py", allow_abbrev=False,
                       description="GPU tests, op benchmarks and a short training benchmark, with one summary.")
    p.add_argument("--anchors", type=Path, default=None, metavar="DIR",
                   help=f"folder holding the peers' {' and '.join(ANCHOR_SCRIPTS)} (run last when given)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where results go (default: $OUT if set, else ./bench-results)")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma list of stages to run: {', '.join(STAGES)}")
    p.add_argument("--ops", default="all", help="the ops stage's --op list (default: all)")
    p.add_argument("--recipe", default=TRAIN_RECIPE, help=f"the train stage's recipe (default {TRAIN_RECIPE})")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per run (default 20)")
    p.add_argument("--compile", action="store_true", help="also time training under torch.compile")
    p.add_argument("--budget", type=float, default=570, metavar="SECONDS",
                   help="wall-clock limit for all stages together, so the summary is printed before a 10-minute "
                        "limit (default 570)")
    a = p.parse_args(list(argv))
    stages = [s.strip() for s in a.only.split(",")]
    for s in stages:
        if s not in STAGES:
            raise BenchError(f"--only: unknown stage {s!r}; valid: {', '.join(STAGES)}")
    a.only = stages
    bench_ops, = bench_names("catalogue", "bench_ops")
    if a.ops != "all":
        for op in a.ops.split(","):
            if op not in bench_ops():
                raise BenchError(f"--ops: unknown op {op!r}; valid: {', '.join(bench_ops())} or all")
    if a.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {a.steps}")
    if a.budget <= 0:
        raise BenchError(f"--budget must be > 0 seconds, got {a.budget}")
    if a.anchors is not None and not a.anchors.is_dir():
        raise BenchError(f"--anchors: {a.anchors} is not a folder")
    if a.out is None:
        a.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench-results")
    return a


def run_stages(a: argparse.Namespace, out: Path, budget: Budget) -> list[StageResult]:
    """The stages ``a.only`` asks for, in order; the kernel benchmarks only after a kernel check that passed."""
    stages: list[StageResult] = []
    check = stage_check(out, budget) if "check" in a.only else None
    if check is not None:
        stages.append(check)
    if "tests" in a.only:
        stages.append(stage_tests(out, budget))
    if "tune" in a.only:  # measures the kernels the check just passed, and rejects any it finds wrong itself
        stages.append(stage_tune(out, budget))
    for name in ("ops", "train"):
        if name not in a.only:
            continue
        if check_failed(check):
            stages.append(StageResult(name, "not run", note="the kernels check failed: see its FAIL rows"))
        elif name == "ops":
            stages.append(stage_ops(out, budget, a.ops))
        else:
            stages.append(stage_train(out, a.steps, a.compile, budget, a.recipe))
    if "anchors" in a.only and a.anchors is not None:
        os.environ["OUT"] = str(out)  # the peers' scripts write their JSON to $OUT
        stages.append(stage_anchors(out, a.anchors.resolve(), budget))
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    BenchError, = bench_names("args", "BenchError")
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device here; this command is for a GPU machine. Without one, run "
              "`tritonforge bench ops` and `tritonforge bench train` (CPU timings, tiny shapes)", file=sys.stderr)
        return 2
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = run_stages(a, out, Budget(a.budget))
    text, payload = summarize(out, stages)
    write_csv, write_json = bench_names("tables", "write_csv", "write_json")
    write_json(out / "summary.json", payload)
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, payload["summary"])
    print("\n" + text)
    print(f"results: {out}")
    return 1 if failed_anywhere(stages, payload) else 0


if __name__ == "__main__":
    sys.exit(main())
