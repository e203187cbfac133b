import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from dcal_lib.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "a" / "b" / "last.pt"
    save_checkpoint(path, {"epoch": 3, "w": torch.arange(4.0), "rng": [1, 2]})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["rng"] == [1, 2]
    assert torch.equal(state["w"], torch.arange(4.0))
    assert os.listdir(path.parent) == ["last.pt"]


@pytest.mark.parametrize("fail_in", ["save", "replace"])
def test_crash_while_writing_keeps_previous_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(1000)})
    real_save = torch.save

    def partial_save(obj, f):
        real_save(obj, f)
        f.truncate(100)  # half-written file, then the crash
        raise OSError("disk full")

    if fail_in == "save":
        monkeypatch.setattr(torch, "save", partial_save)
    else:
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "w": torch.ones(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_killed_mid_write_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    # a child process writes a checkpoint on a "slow disk" (fsync hangs) and is killed -9 meanwhile
    code = (
        "import os, sys, time, torch; from dcal_lib.checkpoint import save_checkpoint\n"
        "os.fsync = lambda fd: time.sleep(60)\n"
        "save_checkpoint(sys.argv[1], {'epoch': 2, 'w': torch.zeros(1_000_000)})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in path.parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "writer finished before it was killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert load_checkpoint(path)["epoch"] == 1
    # the leftover temp file is hidden, never picked up, and the next save works
    assert find_latest_checkpoint(tmp_path) == path
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2


def test_dataparallel_prefixed_state_dict_loads_into_bare_model():
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    wrapped = nn.DataParallel(src)  # on CPU DataParallel just wraps, keys still get "module."
    sd = wrapped.state_dict()
    assert all(k.startswith("module.") for k in sd)
    dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    dst.load_state_dict(unwrap_state_dict(sd))  # strict: a stray prefix would fail here
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert unwrap_state_dict(sd)._metadata["0"] == sd._metadata["module.0"]


def test_unwrap_strips_only_a_leading_prefix():
    sd = {"module.blocks.0.module.weight": 1, "module.head.bias": 2}
    assert unwrap_state_dict(sd) == {"blocks.0.module.weight": 1, "head.bias": 2}
    bare = {"head.module.weight": 1, "norm.bias": 2}
    assert unwrap_state_dict(bare) == bare


def test_find_latest_in_nested_mount_tree(tmp_path):
    new = tmp_path / "input/notebooks/owner/slug/runs/x/checkpoints/last.pt"
    old = tmp_path / "input/other-dataset/checkpoints/last.pt"
    tie_old = tmp_path / "input/a/last.pt"
    save_checkpoint(new, {"epoch": 7})
    save_checkpoint(old, {"epoch": 3})
    save_checkpoint(tmp_path / "input/notebooks/owner/slug/runs/x/checkpoints/best.pt", {"epoch": 9})
    # a later mtime does not beat a higher epoch
    os.utime(new, (1_000, 1_000))
    # equal epoch: the newer file wins
    save_checkpoint(tie_old, {"epoch": 7})
    os.utime(tie_old, (500, 500))
    # a symlink loop must not hang the search
    (tmp_path / "input/notebooks/owner/loop").symlink_to(tmp_path / "input", target_is_directory=True)
    (tmp_path / "input/bad").mkdir()
    (tmp_path / "input/bad/last.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="bad/last.pt"):
        assert find_latest_checkpoint(tmp_path / "input") == new
    assert find_latest_checkpoint(tmp_path / "input", name="best.pt").parent == new.parent
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_corrupt_and_missing_errors_name_the_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"{path}.*older file"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone.pt'}.*check the path"):
        load_checkpoint(tmp_path / "gone.pt")
