"""The measured ``auto`` (engine/ops/tune/), on CPU: an injected clock and injected candidates stand in for the
GPU, so every rule of the decision is exercised without one."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonforge.engine.ops import tune
from tritonforge.engine.ops import reference as op_reference, select as op_select, table as op_table
from tritonforge.engine.optim.build import build_optimizer
from tritonforge.engine.models.gpt import GPT, GPTConfig
from tritonforge.engine.ops.select import resolve
from tritonforge.engine.ops.reference import torch_layer_norm

ROOT = Path(__file__).resolve().parents[2]
TORCH_MS, SLOW_MS, FAST_MS = 1.0, 2.0, 0.5


class FakeClock:
    """Seconds that pass only when a candidate says so: its function calls :meth:`spend`."""

    def __init__(self):
        self.seconds = 0.0

    def now(self) -> float:
        return self.seconds

    def spend(self, ms: float) -> None:
        self.seconds += ms / 1e3

    def time_ms(self, fn) -> float:
        begin = self.seconds
        fn()
        return 1e3 * (self.seconds - begin)


def layer_norm_taking(clock: FakeClock, ms, scale: float = 1.0, error: Exception | None = None):
    """torch's LayerNorm that costs ``ms`` (a number, or a list cycled through) on ``clock``."""
    costs = iter(ms * 10_000 if isinstance(ms, list) else [ms] * 10_000)

    def layer_norm(x, weight=None, bias=None, eps=1e-5):
        if error is not None:
            raise error
        clock.spend(next(costs))
        return torch_layer_norm(x, weight, bias, eps) * scale
    return layer_norm


def jittered(ms: float, sigma: float) -> list[float]:
    """A clock's readings of a call that takes ``ms``, give or take ``sigma`` (seeded)."""
    rng = random.Random(0)
    return [ms + rng.gauss(0.0, sigma) for _ in range(1000)]


def layer_norm_work(count: int = 3) -> tune.CallWork:
    torch.manual_seed(0)
    x, w, b = (torch.randn(8, 32, requires_grad=True), torch.randn(32, requires_grad=True),
               torch.randn(32, requires_grad=True))
    call = tune.Call("layer_norm", (x, w, b, 1e-5), {}, None, count)
    return tune.CallWork(call, torch_layer_norm, torch.device("cpu"))


def candidates(clock: FakeClock, triton_ms, torch_ms=TORCH_MS, **triton) -> dict[str, list[tune.Candidate]]:
    return {"layer_norm": [
        tune.Candidate("torch", "torch", {"layer_norm": layer_norm_taking(clock, torch_ms)}),
        tune.Candidate("triton", "triton", {"layer_norm": layer_norm_taking(clock, triton_ms, **triton)})]}


def decide(clock, cands, cache=None, env=None, settings=None, works=None):
    return tune.decide(works or {"layer_norm": [layer_norm_work()]}, cands, settings or tune.Settings(), clock,
                       cache, env or {"gpu": "test card"}, log=lambda _: None)


def test_a_slower_triton_candidate_loses():
    clock = FakeClock()
    d = decide(clock, candidates(clock, SLOW_MS))["layer_norm"]
    assert (d.choice, d.source, d.why) == ("torch", "measured", "torch is the fastest")
    # ms per micro-batch: the call's cost times the 3 calls a micro-batch makes
    assert d.candidates["torch"]["ms"] == pytest.approx(3 * TORCH_MS)
    assert d.candidates["triton"]["ms"] == pytest.approx(3 * SLOW_MS)
    # far apart: no more than the first repeats
    assert d.candidates["torch"]["repeats"] == tune.START_REPEATS


def test_a_faster_triton_candidate_wins_and_says_by_how_much():
    clock = FakeClock()
    d = decide(clock, candidates(clock, FAST_MS))["layer_norm"]
    assert d.choice == "triton"
    assert d.why.startswith("2.00x torch's speed")


def test_a_gain_within_the_noise_keeps_torch():
    clock = FakeClock()
    d = decide(clock, candidates(clock, 0.97, torch_ms=jittered(1.0, 0.1)))["layer_norm"]
    assert d.choice == "torch"
    assert "within the noise" in d.why
    assert d.candidates["torch"]["repeats"] == tune.MAX_REPEATS  # unclear: measured as long as allowed


def test_a_wrong_candidate_is_rejected_with_a_warning_naming_the_op_and_the_error():
    clock = FakeClock()
    with pytest.warns(RuntimeWarning, match=r"layer_norm: candidate triton rejected: layer_norm .*relative error"):
        d = decide(clock, candidates(clock, FAST_MS, scale=1.01))["layer_norm"]
    assert d.choice == "torch"
    assert d.candidates["triton"]["status"] == "wrong"
    assert d.candidates["triton"]["ms"] is None


def test_a_raising_candidate_falls_back_to_torch():
    clock = FakeClock()
    with pytest.warns(RuntimeWarning, match="layer_norm: candidate triton rejected: RuntimeError: no kernel here"):
        d = decide(clock, candidates(clock, FAST_MS, error=RuntimeError("no kernel here")))["layer_norm"]
    assert d.choice == "torch"
    assert d.candidates["triton"]["status"] == "raised"


def test_a_torch_variant_that_cannot_serve_a_call_is_listed_without_a_warning(recwarn):
    clock = FakeClock()
    cands = candidates(clock, SLOW_MS)
    cands["layer_norm"].insert(1, tune.Candidate("torch-other", "torch", {
        "layer_norm": layer_norm_taking(clock, FAST_MS, error=RuntimeError("no kernel for this mask"))}))
    d = decide(clock, cands)["layer_norm"]
    assert d.choice == "torch" and d.candidates["torch-other"]["status"] == "raised"
    assert not [w for w in recwarn if "kernels tune" in str(w.message)]
    assert "torch-other raised" in tune.table({"layer_norm": d})


def test_a_candidate_is_held_to_the_reference_no_tighter_than_torch_itself():
    """Where torch's own result is off the upcast reference (an update below the parameters' rounding), a
    candidate just as close passes; the kernels check's tolerance applies above that."""
    clock = FakeClock()
    work = layer_norm_work()
    work.tolerance = 1e-12  # below float32's own rounding: torch's error sets the bar
    d = decide(clock, candidates(clock, FAST_MS), works={"layer_norm": [work]})["layer_norm"]
    assert d.candidates["triton"]["status"] == "ok" and d.candidates["torch"]["error"] > 1e-12


def test_a_reference_that_cannot_be_computed_keeps_torch():
    clock = FakeClock()
    work = layer_norm_work()
    work.reference_fn = layer_norm_taking(clock, 0.0, error=torch.OutOfMemoryError("float32 copy"))
    d = decide(clock, candidates(clock, FAST_MS), works={"layer_norm": [work]})["layer_norm"]
    assert d.choice == "torch" and "the reference failed: OutOfMemoryError" in d.why


def test_the_budget_stops_the_repeats_and_an_untimed_op_keeps_torch():
    clock = FakeClock()
    settings = tune.Settings(op_seconds=0.02, total_seconds=0.02)
    d = decide(clock, candidates(clock, 0.97, torch_ms=jittered(1.0, 0.1)), settings=settings)["layer_norm"]
    assert tune.MIN_REPEATS <= d.candidates["torch"]["repeats"] < tune.MAX_REPEATS
    spent = decide(clock, candidates(clock, FAST_MS), settings=tune.Settings(total_seconds=0.0))["layer_norm"]
    assert (spent.choice, spent.candidates) == ("torch", {})
    assert "budget" in spent.why


def test_the_cache_is_hit_then_invalidated_by_another_card(tmp_path):
    cache = tune.TuneCache(tmp_path)
    clock = FakeClock()
    first = decide(clock, candidates(clock, FAST_MS), cache)["layer_norm"]
    assert first.source == "measured"
    before = clock.seconds
    again = decide(clock, candidates(clock, SLOW_MS), cache)["layer_norm"]  # slower now: the cache is not asked
    assert (again.source, again.choice, clock.seconds) == ("cache", "triton", before)  # no time spent
    other = decide(clock, candidates(clock, SLOW_MS), cache, env={"gpu": "another card"})["layer_norm"]
    assert (other.source, other.choice) == ("measured", "torch")
    other_shapes = decide(clock, candidates(clock, SLOW_MS), cache, works={"layer_norm": [layer_norm_work(4)]})
    assert other_shapes["layer_norm"].source == "measured"
    retuned = decide(clock, candidates(clock, SLOW_MS), cache, settings=tune.Settings(retune=True))
    assert retuned["layer_norm"].source == "measured"


def test_a_torn_cache_entry_is_ignored_with_a_warning(tmp_path):
    cache = tune.TuneCache(tmp_path)
    clock = FakeClock()
    decide(clock, candidates(clock, FAST_MS), cache)
    (entry,) = (tmp_path / "tune").glob("*.json")
    entry.write_text(entry.read_text()[:40])  # a write cut short (by another tool: ours rename whole files)
    with pytest.warns(RuntimeWarning, match="ignoring the damaged cache entry"):
        d = decide(clock, candidates(clock, SLOW_MS), cache)["layer_norm"]
    assert (d.source, d.choice) == ("measured", "torch")
    assert json.loads(entry.read_text())["value"]["choice"] == "torch"  # rewritten whole
    assert not list((tmp_path / "tune").glob("*.tmp"))


def test_the_cache_keeps_a_kernels_own_configuration(tmp_path):
    cache = tune.TuneCache(tmp_path)
    cpu = torch.device("cpu")
    assert cache.kernel_config("attention_fwd", {"head_dim": 64}, cpu) is None
    cache.keep_kernel_config("attention_fwd", {"head_dim": 64}, cpu, {"BLOCK_M": 128, "num_warps": 8})
    assert cache.kernel_config("attention_fwd", {"head_dim": 64}, cpu) == {"BLOCK_M": 128, "num_warps": 8}


def test_the_cache_folder_follows_xdg_and_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tune.cache_dir() == tmp_path / "tritonforge"
    assert tune.cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"


def test_a_resumed_run_keeps_the_recorded_choice_unless_told_to_retune():
    clock = FakeClock()
    ops = resolve({}, "cpu")
    works = {"layer_norm": [layer_norm_work()]}
    kept = tune.tune_ops(ops, works, candidates(clock, SLOW_MS), tune.Settings(), clock, None, {},
                         recorded={"layer_norm": "triton"}, log=lambda _: None)
    assert (kept["layer_norm"].choice, kept["layer_norm"].source, clock.seconds) == ("triton", "checkpoint", 0.0)
    assert ops.backends["layer_norm"] == "triton"
    retuned = tune.tune_ops(ops, works, candidates(clock, SLOW_MS), tune.Settings(retune=True), clock, None, {},
                            recorded={"layer_norm": "triton"}, log=lambda _: None)
    assert (retuned["layer_norm"].choice, retuned["layer_norm"].source) == ("torch", "measured")
    assert ops.backends["layer_norm"] == "torch"


def test_the_choice_reaches_a_model_built_before_it():
    clock = FakeClock()
    ops = resolve({}, "cpu")
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=8, vocab_size=64), ops)
    lines = []
    tune.tune_ops(ops, {"layer_norm": [layer_norm_work()]}, candidates(clock, FAST_MS), tune.Settings(), clock,
                  None, {}, log=lines.append)
    before = clock.seconds
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert clock.seconds > before  # the model's norms now run the chosen (clock-ticking) function
    assert "triton" in lines[-1] and "2.00x torch's speed" in lines[-1]


def test_explicit_backends_and_other_modes_are_not_tuned():
    cuda = torch.device("cuda")  # a device value only: nothing runs on it
    used = ("attention", "layer_norm", "cross_entropy", "optimizer")
    choices = {op: "auto" for op in op_table.op_names()} | {"attention": "triton", "layer_norm": "torch"}
    assert tune.tunable(choices, used, tune.Settings(), cuda) == ["cross_entropy", "optimizer"]
    assert tune.tunable(choices, used, tune.Settings(mode="trust"), cuda) == []
    assert tune.tunable(choices, used, tune.Settings(), torch.device("cpu")) == []
    start = tune.starting_choices(choices, "measure", cuda)
    assert (start["attention"], start["layer_norm"], start["cross_entropy"]) == ("triton", "torch", "torch")
    assert tune.starting_choices(choices, "trust", cuda)["cross_entropy"] == "auto"
    assert tune.starting_choices(choices, "off", cuda)["cross_entropy"] == "torch"
    assert tune.starting_choices(choices, "off", torch.device("cpu")) == choices  # a CPU: unchanged


def test_recording_the_calls_of_a_training_step_leaves_no_trace():
    ops = resolve({}, "cpu")
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, context=8, vocab_size=64, window=4), ops)
    x, y = torch.randint(0, 64, (3, 8)), torch.randint(0, 64, (3, 8))

    def step():
        model(x, y).backward()
    calls = tune.record_calls(ops, ["attention", "layer_norm", "cross_entropy"], step, model, torch.device("cpu"))
    attention = calls["attention"]
    assert len(attention) == 1 and attention[0].count == 2  # one kind of call, once per layer
    signature = json.loads(attention[0].signature)
    assert signature["kwargs"]["window"] == 4 and signature["args"][0]["shape"] == [3, 2, 8, 16]
    assert {c.function for c in calls["layer_norm"]} >= {"layer_norm"}
    assert all(p.grad is None for p in model.parameters())
    assert ops.attention is op_reference.torch_attention  # unwrapped again
    work = tune.CallWork(attention[0], op_reference.torch_attention, torch.device("cpu"))
    _, error = work.first_run(tune.Candidate("torch", "torch", {"attention": op_reference.torch_attention}))
    assert error < 1e-5


def test_recording_restores_the_rng():
    ops = resolve({}, "cpu")
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, context=8, vocab_size=64, dropout=0.5), ops)
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    tune.record_calls(ops, ["attention"], lambda: model(x, y).backward(), model, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)


def test_the_optimizer_step_is_checked_against_float64():
    torch.manual_seed(0)
    params = [torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)]

    def make(backend, groups, device):
        return build_optimizer(op_select.Ops({"optimizer": backend}, {}), "adamw", groups, lr=1e-3, weight_decay=0.1,
                                                                       max_grad_norm=1.0, device=device)
    work = tune.OptimizerWork([{"params": params}], make, 1.0, torch.device("cpu"), "adamw")
    _, error = work.first_run(tune.Candidate("torch", "torch"))
    assert error < tune.OPTIMIZER_TOLERANCE
    assert "adamw" in json.loads(work.signature)["optimizer"]


def test_on_a_cpu_auto_is_torch_and_says_so():
    from tritonforge.engine.config import Recipe

    class Task:
        def ops_used(self):
            return ("attention", "optimizer")
    lines = []
    assert tune.tune_run(Recipe(), resolve({}, "cpu"), Task(), torch.device("cpu"), log=lines.append) == {}
    assert lines == ["kernels tune: no CUDA device here: auto serves torch, nothing is measured"]


AGREE = """
import os, sys, json, warnings
import torch, torch.distributed as dist
sys.path[:0] = [{tests!r}, {tests!r} + "/engine"]
import conftest  # binds tritonforge to the checkout
from tritonforge.engine.distributed import cleanup
from tritonforge.engine.ops import tune
from tritonforge.engine.ops import reference as op_reference, select as op_select, table as op_table
from test_tune import FakeClock, candidates, layer_norm_work

dist.init_process_group("gloo")
rank = dist.get_rank()
clock = FakeClock()
# rank 1's candidates would make triton win: only rank 0's measurement counts
cands = candidates(clock, 2.0 if rank == 0 else 0.5)
ops = op_select.resolve({{}}, "cpu")
works = {{"layer_norm": [layer_norm_work()]}} if rank == 0 else {{}}
# rank 0 autotuned a Triton kernel while it measured: its choice goes to rank 1 with the decisions
kept = tune.KeptConfigs(None, torch.device("cpu"), env={{}})
if rank == 0:
    kept.put("attention.fwd", {{"tune_seqlen": 64}}, {{"BLOCK_M": 64, "num_warps": 4}})
d = tune.tune_ops(ops, works, cands, tune.Settings(), clock, None, {{}}, rank, 2, log=lambda _: None, configs=kept)
with open(f"rank{{rank}}.json", "w") as f:
    json.dump({{"rank": rank, "choice": d["layer_norm"].choice, "backend": ops.backends["layer_norm"],
               "measured_here": clock.seconds > 0, "tiles": kept.get("attention.fwd", {{"tune_seqlen": 64}})}}, f)
cleanup()  # the engine's teardown: a barrier first
"""


@pytest.mark.slow
def test_ranks_agree_on_rank_zeros_choice_and_its_kept_tiles(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["choice"], r["backend"]) for r in results] == [("torch", "torch"), ("torch", "torch")]
    assert [r["measured_here"] for r in results] == [True, False]
    assert [r["tiles"] for r in results] == [{"BLOCK_M": 64, "num_warps": 4}] * 2


class WallClock:
    """The CPU's clock, for a measurement that only has to run (its times mean nothing in the interpreter)."""

    def now(self) -> float:
        return time.perf_counter()

    def time_ms(self, fn) -> float:
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)


@pytest.mark.slow
def test_the_project_kernels_pass_the_check_on_a_runs_recorded_calls():
    """The whole measurement on a tiny GPT's real calls, the Triton candidates run by the interpreter: each is
    checked against the upcast reference and timed (times meaningless here), and a decision is made."""
    from tritonforge.engine.bench.synthetic import SyntheticTask
    from tritonforge.engine.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "gpt_cpu.toml", [
        "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=16", "--train.seq_len=16",
        "--train.batch_size=2", "--optim.name=adamw", "--model.qk_norm=false"])
    cpu = torch.device("cpu")
    ops = resolve({}, cpu)
    task = SyntheticTask(recipe, ops, cpu)
    to_tune = ["attention", "layer_norm", "cross_entropy", "optimizer"]
    works = tune.record_works(recipe, ops, task, cpu, to_tune)
    assert {w.label.split()[0] for w in works["layer_norm"]} == {"layer_norm", "add_layer_norm"}
    cands = {op: tune.candidates(op, cpu, deterministic=True)[0] for op in to_tune}
    assert all([c.name for c in cands[op]] == ["torch", "triton"] for op in to_tune)  # no CUDA: no SDPA variants
    decisions = tune.tune_ops(ops, works, cands, tune.Settings(op_seconds=0.5), WallClock(), None, {},
                              log=lambda _: None)
    for op in to_tune:
        assert decisions[op].candidates["triton"]["status"] == "ok", (op, decisions[op].candidates["triton"])
        assert decisions[op].candidates["torch"]["error"] < 1e-4


def test_clipping_in_one_candidates_check_leaves_the_next_ones_gradients_alone():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, requires_grad=True)]

    def make(backend, groups, device):
        return build_optimizer(op_select.Ops({"optimizer": "torch"}, {}), "sgd", groups, lr=1e-2, momentum=0.0,
                                                                       device=device)
    work = tune.OptimizerWork([{"params": params}], make, 0.1, torch.device("cpu"), "sgd")  # clipping applies
    first, second = (work.first_run(tune.Candidate(name, "torch"))[1] for name in ("first", "second"))
    assert first == second  # the same gradients, clipped afresh


def test_a_checkpoints_recorded_choice_is_read_back(tmp_path):
    path = tmp_path / "ckpt-00000010.pt"
    torch.save({"step": 10, "kernels_tuned": {"attention": "sdpa-cudnn", "optimizer": "triton"}}, path)
    assert tune.recorded_choice(path) == {"attention": "sdpa-cudnn", "optimizer": "triton"}
    torch.save({"step": 10}, path)  # a checkpoint from before tuning, or of a run that tuned nothing
    assert tune.recorded_choice(path) == {} and tune.recorded_choice(None) == {}


@pytest.mark.slow
def test_a_run_records_its_tuning_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    """The trainer's wiring, on CPU with the GPU's parts stood in for: the Triton candidates run by the
    interpreter, timed by the CPU's clock. The choice reaches env.json and the checkpoint; resuming reads it
    back instead of measuring."""
    from support import Sink

    from tritonforge.engine.config import load_recipe
    from tritonforge.engine.train.trainer import Trainer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"the quick brown fox {i} jumps. " * 8}) for i in range(100)))

    def tiny_recipe(*extra):
        return load_recipe(None, ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2",
                                  "--model.context=16", "--train.seq_len=16", "--train.batch_size=4",
                                  "--train.eval_batches=1", f"--data.source={corpus}", "--data.val_fraction=0.1",
                                  f"--data.cache_dir={tmp_path / 'data'}", f"--run.dir={tmp_path / 'run'}", *extra])

    monkeypatch.setattr(tune.run, "tunable", lambda choices, used, settings, device: [
        op for op in op_table.op_names() if op in used and choices.get(op) == "auto"])
    monkeypatch.setattr(tune.run, "CudaClock", lambda device: WallClock())
    monkeypatch.setattr(tune.run, "environment_key", lambda device: {"gpu": "stand-in"})
    args = ["--train.eval_every=0", "--train.log_every=1", "--train.sample_tokens=0",
            "--kernels.tune_op_seconds=0.2", f"--kernels.tune_cache={tmp_path / 'cache'}"]
    trainer = Trainer(tiny_recipe(*args, "--train.steps=2"), stream=Sink())
    trainer.fit()
    trainer.close()
    tuning = json.loads((tmp_path / "run" / "env.json").read_text())["tuning"]
    assert set(tuning) == {"attention", "layer_norm", "cross_entropy", "optimizer"}
    assert all(d["source"] == "measured" and d["candidates"]["triton"]["status"] == "ok" for d in tuning.values())
    chosen = {op: d["choice"] for op, d in tuning.items()}
    saved = max((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert tune.recorded_choice(saved) == chosen

    sink = Sink()
    resumed = Trainer(tiny_recipe(*args, "--train.steps=3", "--checkpoint.resume=latest"), stream=sink)
    assert {op: d.choice for op, d in resumed.tuned.items()} == chosen
    assert {d.source for d in resumed.tuned.values()} == {"checkpoint"}
    resumed.close()


def test_the_tune_command_on_a_cpu_says_there_is_nothing_to_measure(capsys):
    from tritonforge.engine import cli

    assert cli.main(["kernels", "tune", str(ROOT / "recipes" / "gpt_cpu.toml"), "--model.n_layer=1"]) == 0
    assert capsys.readouterr().out.strip() == tune.NO_CUDA
    assert cli.main(["kernels", "tune", str(ROOT / "recipes" / "gpt_cpu.toml"), "--model.bogus=1"]) == 2
    assert "unknown key model.bogus" in capsys.readouterr().err


def test_the_probe_leaves_a_carried_recurrent_state_alone():
    class Task:
        carried, forwards = [None], 0

        def batch(self, step, micro):
            return torch.ones(2, requires_grad=True), None

        def loss(self, model, inputs, targets):
            self.carried[0], self.forwards = (inputs.detach(),), self.forwards + 1
            return inputs.sum()
    task = Task()
    tune.probe_step(task, None, "fp32", torch.device("cpu"))()
    assert task.carried == [None] and task.forwards == 0


# ---------------------------------------------------------------------------------------------------
# Triton's autotuned choices, kept (engine/ops/tune/kept.py)
# ---------------------------------------------------------------------------------------------------

def test_kept_configs_survive_the_process_and_are_keyed_by_the_environment(tmp_path):
    cpu = torch.device("cpu")
    key, config = {"tune_seqlen": 1024, "dtype": "bf16"}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
                                                             "num_stages": 3}
    first = tune.KeptConfigs(tune.TuneCache(tmp_path), cpu)
    assert first.get("attention.fwd", key) is None
    first.put("attention.fwd", key, config)
    again = tune.KeptConfigs(tune.TuneCache(tmp_path), cpu)  # a later run on the same card and versions
    assert again.get("attention.fwd", key) == config
    assert again.get("attention.dkdvdq", key) is None and again.get("attention.fwd", {**key, "dtype": "fp16"}) is None
    other = tune.KeptConfigs(tune.TuneCache(tmp_path), cpu, env={**again.env, "triton": "0.0"})  # another version
    assert other.get("attention.fwd", key) is None
    assert tune.KeptConfigs(tune.TuneCache(tmp_path), cpu, retune=True).get("attention.fwd", key) is None


def test_a_damaged_kept_config_is_ignored_with_a_warning(tmp_path):
    cpu = torch.device("cpu")
    store = tune.KeptConfigs(tune.TuneCache(tmp_path), cpu)
    store.put("attention.fwd", {"s": 1}, {"BLOCK_M": 64})
    (entry,) = (tmp_path / "tune").glob("*.json")
    entry.write_text(entry.read_text()[:20])  # a torn write
    with pytest.warns(RuntimeWarning, match="damaged cache entry"):
        assert tune.KeptConfigs(tune.TuneCache(tmp_path), cpu).get("attention.fwd", {"s": 1}) is None


def test_the_trainer_installs_the_store_only_on_cuda(monkeypatch, tmp_path):
    from tritonforge.engine.ops.tune import kept as kept_module
    installed = []

    class Kernels:
        def set_config_store(self, store):
            installed.append(store)
    monkeypatch.setattr(kept_module, "kernels_module", lambda: Kernels())
    assert kept_module.install(tune.TuneCache(tmp_path), torch.device("cpu")) is None and installed == []
    monkeypatch.setattr(kept_module, "environment_key", lambda device: {"gpu": "test"})
    store = kept_module.install(tune.TuneCache(tmp_path), torch.device("cuda"))
    assert installed == [store] and store.env == {"gpu": "test"}
