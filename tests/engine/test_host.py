"""The process settings of a CPU run: glibc's malloc keeping the memory a step frees (``run.cpu_memory``)."""
import platform

import pytest
import torch

from tritonforge.engine.config import RecipeError, load_recipe
from tritonforge.engine.device import set_up_host
from support import run_isolated

GLIBC = platform.libc_ver()[0] == "glibc"

# A training step's pattern in miniature: blocks of several sizes (0.8 to 20 MB) allocated, written and freed
# out of order; after a warm-up, the fewest minor page faults per round over five runs of ten rounds.
CHURN = """
    import resource, torch
    from tritonforge.engine.device import keep_freed_memory
    kept = keep_freed_memory() if {keep} else False
    def churn():
        a = torch.ones(3_000_000); b = torch.ones(1_000_000); c = torch.ones(5_000_000)
        del a
        d = torch.ones(200_000); e = torch.ones(3_000_000)
        del c, b, d, e
    for _ in range(3):
        churn()
    fewest = float("inf")
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            churn()
        fewest = min(fewest, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    print(kept, fewest)
"""


def churn_faults(keep: bool) -> tuple[bool, float]:
    done = run_isolated(CHURN.format(keep=keep), timeout=120)
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    kept, faults = churn_faults(True)
    _, default_faults = churn_faults(False)
    # Each round writes 12.2M floats (49 MB): a few faults for bookkeeping pages at most (none here), against
    # hundreds (781 a round on glibc 2.36) with glibc's adaptive defaults.
    assert kept and faults < 50, (faults, default_faults)


def test_set_up_host_keeps_memory_on_a_cpu_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr("tritonforge.engine.device.keep_freed_memory", lambda: calls.append(1) or True)
    threads = torch.get_num_threads()
    try:
        assert set_up_host(torch.device("cpu"), 1, "keep") and torch.get_num_threads() == 1 and calls == [1]
        assert not set_up_host(torch.device("cpu"), 0, "release") and calls == [1]
        assert not set_up_host(torch.device("meta"), 0, "keep") and calls == [1]  # not a CPU: untouched
    finally:
        torch.set_num_threads(threads)


def test_a_wrong_cpu_memory_policy_is_named():
    with pytest.raises(RecipeError, match="run.cpu_memory"):
        load_recipe(None, ["--run.cpu_memory=always"])
