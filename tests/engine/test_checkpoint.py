"""Checkpoint files: atomic writes, verification on load, pruning to the newest K."""
import json
import os

import pytest
import torch

from tritonforge.engine import checkpoint
from tritonforge.engine.checkpoint import CheckpointError


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((64,), float(step)), "meta": {"name": "x", "betas": (0.9, 0.95)}}


def steps_in(folder) -> list[int]:
    return [checkpoint.step_of(m) for m in checkpoint.list_checkpoints(folder)]


def test_roundtrip_and_latest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, state(step), keep=5)
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt-00000003.pt"
    loaded = checkpoint.load(tmp_path)  # a folder means its newest checkpoint
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state(3)["w"]) and loaded["meta"]["betas"] == (0.9, 0.95)
    manifest = json.loads((tmp_path / "ckpt-00000003.json").read_text())
    entry = manifest["files"]["ckpt-00000003.pt"]
    assert entry["bytes"] == (tmp_path / "ckpt-00000003.pt").stat().st_size and len(entry["sha256"]) == 64


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, state(step), keep=2)
    assert steps_in(tmp_path) == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000004.json", "ckpt-00000004.pt", "ckpt-00000005.json",
                                            "ckpt-00000005.pt"]


def test_saving_an_earlier_step_drops_the_abandoned_later_ones(tmp_path):
    """After resuming from step 2, checkpoints of steps 3 and 4 belong to a future that did not happen."""
    for step in (2, 3, 4):
        checkpoint.save(tmp_path, step, state(step), keep=5)
    checkpoint.save(tmp_path, 3, state(3), keep=5)
    assert steps_in(tmp_path) == [2, 3]


def test_truncated_checkpoint_is_refused_with_a_clear_message(tmp_path):
    checkpoint.save(tmp_path, 1, state(1))
    path = checkpoint.save(tmp_path, 2, state(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt-00000002\.pt is truncated or corrupt: \d+ bytes, expected") as e:
        checkpoint.load(path)
    assert "ckpt-00000001.pt" in str(e.value)  # names the checkpoint still there to fall back to


def test_corrupted_bytes_are_detected_by_the_hash(tmp_path):
    path = checkpoint.save(tmp_path, 1, state(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        checkpoint.load(path)


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    path = checkpoint.save(tmp_path, 1, state(1))
    path.with_suffix(".json").unlink()
    assert checkpoint.latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="no manifest .* it is incomplete"):
        checkpoint.load(path)
    (tmp_path / "ckpt-00000001.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .* is unreadable"):
        checkpoint.load(path)


def test_a_kill_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, state(1))

    def killed_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, state(2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.json", "ckpt-00000001.pt"]
    assert checkpoint.load(tmp_path)["step"] == 1


def test_leftovers_of_a_killed_write_are_cleaned_up(tmp_path):
    (tmp_path / ".ckpt-00000002.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"renamed, but the manifest never came")
    checkpoint.save(tmp_path, 3, state(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000003.json", "ckpt-00000003.pt"]


class Payload:
    """Not a tensor or a plain value: a checkpoint must never unpickle (and so run) arbitrary objects."""


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"step": 1, "obj": Payload()})
    with pytest.raises(CheckpointError, match="could not be loaded"):
        checkpoint.load(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "ckpt-00000009.pt")


def test_sharded_parts_round_trip_and_are_verified(tmp_path):
    model = torch.nn.Linear(3, 2)
    sharded = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    path = checkpoint.save(tmp_path, 1, state(1), sharded=sharded)
    assert path.with_suffix(".dcp").is_dir()
    template = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    checkpoint.load(path)
    checkpoint.load_sharded(path, template)
    for k, v in model.state_dict().items():
        assert torch.equal(template["model"][k], v)
    shard = next(f for f in path.with_suffix(".dcp").iterdir() if f.name.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(8)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_pruning_removes_old_shards(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, state(step), keep=1, sharded={"w": torch.ones(2) * step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003.dcp", "ckpt-00000003.json", "ckpt-00000003.pt"]
