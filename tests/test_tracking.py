import os
import sys
import time
import types
import warnings
from pathlib import Path

import pytest

from dcal_lib import tracking
from dcal_lib.tracking import Tracker, TrackingWarning, make_tracker

from .conftest import free_port


def _mlflow_run_then_resume(uri, run_dir, artifact, name):
    """Steps 1..3 in a first run, then 4..5 after a resume with changed params (logged as tags)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        t = make_tracker("mlflow", run_name=name, run_dir=run_dir, mlflow_uri=uri,
                         params={"lr": 1e-3, "batch_size": 8})
        for step in (1, 2, 3):
            t.log_metrics({"loss": 1 / step, "twin_eer": 0.5}, step=step)
        t.log_artifact(artifact)
        t.finish()
        t2 = make_tracker("mlflow", run_name=name, run_dir=run_dir, mlflow_uri=uri,
                          run_id=t.run_id, params={"lr": 2e-3, "batch_size": 8})
        for step in (4, 5):
            t2.log_metrics({"loss": 1 / step}, step=step)
        t2.set_tags({"resume.lr": "0.001 -> 0.002"})
        t2.finish()
    assert t2.run_id == t.run_id
    return t.run_id


def _check_mlflow_run(uri, run_id, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dcal-twins")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")  # server is shared
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "batch_size": "8"}
    assert run.data.tags["resume.lr"] == "0.001 -> 0.002"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(s, pytest.approx(1 / s)) for s in (1, 2, 3, 4, 5)]
    assert [m.step for m in client.get_metric_history(run_id, "twin_eer")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(run_id)] == ["roc.png"]
    return client


def test_mlflow_server_run_resumes_same_run(mlflow_server, tmp_path):
    artifact = tmp_path / "roc.png"
    artifact.write_bytes(b"\x89PNG fake plot")
    run_id = _mlflow_run_then_resume(mlflow_server, tmp_path / "runs/demo", artifact, tmp_path.name)
    client = _check_mlflow_run(mlflow_server, run_id, tmp_path.name)
    local = client.download_artifacts(run_id, "roc.png", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == artifact.read_bytes()
    assert not (tmp_path / "runs/mlflow.db").exists()  # a server URI never creates the local store


def test_mlflow_local_store_without_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    artifact = tmp_path / "roc.png"
    artifact.write_bytes(b"\x89PNG fake plot")
    run_id = _mlflow_run_then_resume("", tmp_path / "runs/demo", artifact, "demo")
    _check_mlflow_run(f"sqlite:///{tmp_path}/runs/mlflow.db", run_id, "demo")
    assert list((tmp_path / "runs/mlartifacts").rglob("roc.png"))
    assert not (tmp_path / "mlruns").exists()  # nothing scattered in the working directory


def test_mlflow_unknown_run_id_starts_new_run(tmp_path):
    with pytest.warns(TrackingWarning, match="0123abcd not found"):
        t = make_tracker("mlflow", run_name="x", run_dir=tmp_path / "runs/x", run_id="0123abcd",
                         params={"lr": 1.0})
    assert isinstance(t, tracking.MLflowTracker) and t.run_id != "0123abcd"
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").get_run(t.run_id).data.params == {"lr": "1.0"}


def _count_tracking_warnings(record):
    return sum(issubclass(w.category, TrackingWarning) for w in record)


@pytest.mark.parametrize("run_id", [None, "abc123"])
def test_dead_mlflow_server_warns_once_and_goes_on(tmp_path, run_id):
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = make_tracker("mlflow", run_name="x", run_dir=tmp_path / "x", run_id=run_id,
                         mlflow_uri=f"http://127.0.0.1:{free_port()}", params={"lr": 1})
        for step in range(3):
            t.log_metrics({"loss": 1.0}, step=step)
        t.set_tags({"a": "b"})
        t.log_artifact(tmp_path / "missing.png")
        t.finish()
    assert time.monotonic() - start < 10
    assert _count_tracking_warnings(record) == 1
    msg = str(next(w.message for w in record if issubclass(w.category, TrackingWarning)))
    assert msg.startswith("tracking disabled: mlflow failed") and "training continues untracked" in msg
    assert type(t) is Tracker and t.run_id == run_id  # kept for the checkpoint, so a later resume continues


def test_failure_mid_run_warns_once_then_no_ops(mlflow_server, tmp_path, monkeypatch):
    t = make_tracker("mlflow", run_name="x", run_dir=tmp_path / "runs/x", mlflow_uri=mlflow_server)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("server went away")

    monkeypatch.setattr(t.client, "log_batch", broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(5):
            t.log_metrics({"loss": 1.0}, step=step)
        t.finish()
    assert len(calls) == 1 and _count_tracking_warnings(record) == 1
    assert any("server went away" in str(w.message) for w in record)


def _wandb_run_dirs(run_dir, run_id):
    return sorted((Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_writes_under_run_dir_and_resumes_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "runs/demo"
    plot, ckpt = tmp_path / "roc_twin.png", tmp_path / "last.pt"
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(plot)
    plt.close("all")
    ckpt.write_bytes(b"checkpoint bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        t = make_tracker("wandb", run_name="demo", run_dir=run_dir, wandb_project="dcal-twins",
                         params={"lr": 1e-3})
        assert isinstance(t, tracking.WandbTracker) and t.run_id
        for step in (1, 2, 3):
            t.log_metrics({"loss": 1 / step}, step=step)
        t.log_artifact(plot)
        assert t.run.step == 3  # the plot joins step 3: a later log at step 3 must not be dropped
        t.log_artifact(ckpt)
        t.finish()
        t2 = make_tracker("wandb", run_name="demo", run_dir=run_dir, wandb_project="dcal-twins",
                          run_id=t.run_id)
        t2.log_metrics({"loss": 0.25}, step=4)
        t2.set_tags({"resume.lr": "0.002"})
        t2.finish()
    assert t2.run_id == t.run_id
    dirs = _wandb_run_dirs(run_dir, t.run_id)
    assert len(dirs) == 2 and all((d / f"run-{t.run_id}.wandb").stat().st_size > 0 for d in dirs)
    files = [p.name for d in dirs for p in d.rglob("*") if p.is_file()]
    assert any(n.startswith("roc_twin_") and n.endswith(".png") for n in files)
    assert not any(n.endswith(".pt") for n in files)  # checkpoints are never uploaded


def test_wandb_key_from_kaggle_secrets_and_init_failure(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "")
    secrets = types.SimpleNamespace(UserSecretsClient=lambda: types.SimpleNamespace(get_secret={
        "WANDB_API_KEY": "k" * 40}.__getitem__))
    monkeypatch.setitem(sys.modules, "kaggle_secrets", secrets)
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("no network")))
    with pytest.warns(TrackingWarning, match="tracking disabled: wandb failed: RuntimeError: no network"):
        t = make_tracker("wandb", run_name="x", run_dir=tmp_path / "x", run_id="r1")
    assert os.environ["WANDB_API_KEY"] == "k" * 40
    assert type(t) is Tracker and t.run_id == "r1"


def test_none_tracker(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = make_tracker("none", run_name="x", run_dir=tmp_path / "x", params={"lr": 1})
        assert type(t) is Tracker and t.run_id is None
        assert t.log_params({"a": 1}) is None
        assert t.log_metrics({"loss": 1.0}, step=1) is None
        assert t.set_tags({"a": "b"}) is None
        assert t.log_artifact(tmp_path / "missing.png") is None
        assert t.finish() is None
    assert make_tracker("none", run_name="x", run_dir=tmp_path, run_id="abc").run_id == "abc"
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="tracker='tensorboard'"):
        make_tracker("tensorboard", run_name="x", run_dir=tmp_path)
