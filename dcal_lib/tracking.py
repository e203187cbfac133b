"""Experiment tracking: MLflow, W&B or none, behind one small interface.

Tracking must never kill a training run: the first back-end error prints one warning and the tracker
turns into the no-op back-end for the rest of the run.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path

EXPERIMENT = "dcal-twins"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class TrackingWarning(UserWarning):
    """A tracking back-end failed; training goes on untracked."""


def _disable_on_error(method):
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self._off:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self._off = True
            _warn(self.kind, e)

    return guarded


def _warn(kind: str, error: Exception) -> None:
    msg = f"tracking disabled: {kind} failed: {type(error).__name__}: {error}; training continues untracked"
    warnings.warn(msg, TrackingWarning, stacklevel=3)


class Tracker:
    """The "none" back-end. `run_id` is kept even here so the next resume can continue the same run."""

    kind = "none"

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self._off = True

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path) -> None: ...  # MLflow: any file; W&B: images only
    def finish(self) -> None: ...


class MLflowTracker(Tracker):
    """One MLflow run through an explicit client (no global active run, so trackers do not collide)."""

    kind = "mlflow"

    def __init__(self, uri: str, run_name: str, run_id: str | None = None, artifact_root: str | None = None):
        # fail within seconds on a dead server instead of minutes of retries, but ride out a short blip
        for var, value in [("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "10")]:
            os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{var}", value)
        from mlflow import entities
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client, self._entities, self._off, self.new = MlflowClient(uri), entities, False, True
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.new = False
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(f"MLflow run {run_id} not found at {uri}; starting a new run",
                              TrackingWarning, stacklevel=3)
        if self.new:
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT, artifact_root)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.run_id = run_id

    @_disable_on_error
    def log_params(self, params):
        items = [self._entities.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_disable_on_error
    def log_metrics(self, metrics, step):
        now = int(time.time() * 1000)
        batch = [self._entities.Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    @_disable_on_error
    def set_tags(self, tags):
        self.client.log_batch(self.run_id, tags=[self._entities.RunTag(k, str(v)) for k, v in tags.items()])

    @_disable_on_error
    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    @_disable_on_error
    def finish(self):
        self.client.set_terminated(self.run_id, "FINISHED")
        self._off = True


class WandbTracker(Tracker):
    """One W&B run. Metrics and plot images only: checkpoints are never uploaded.

    W&B silently drops a step lower than the run's current one, so callers pass global steps that keep
    increasing across a resume. The mode (online/offline) comes from WANDB_MODE.
    """

    kind = "wandb"

    def __init__(self, project: str, entity: str, run_name: str, run_dir, run_id=None, params=None):
        import wandb

        from .kaggle import wandb_key_from_secrets

        # off Kaggle wandb falls back to its own login (~/.netrc); offline it needs no key
        if not os.environ.get("WANDB_API_KEY") and (key := wandb_key_from_secrets()):
            os.environ["WANDB_API_KEY"] = key
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.new, self._off, self._wandb = run_id is None, False, wandb
        self.run = wandb.init(
            project=project or None, entity=entity or None, name=run_name, dir=str(run_dir),
            id=run_id, resume="allow", config=params if self.new else None,
        )
        self.run_id = self.run.id

    @_disable_on_error
    def log_params(self, params):
        self.run.config.update(params, allow_val_change=True)

    @_disable_on_error
    def log_metrics(self, metrics, step):
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    @_disable_on_error
    def set_tags(self, tags):  # W&B tags are short labels; key/value notes belong in the config
        self.run.config.update(tags, allow_val_change=True)

    @_disable_on_error
    def log_artifact(self, path):
        path = Path(path)
        if path.suffix.lower() in IMAGE_SUFFIXES:  # commit=False: attach to the last step, do not advance
            self.run.log({path.stem: self._wandb.Image(str(path))}, commit=False)

    @_disable_on_error
    def finish(self):
        self.run.finish()
        self._off = True


def make_tracker(kind, *, run_name, run_dir, mlflow_uri="", wandb_project="", wandb_entity="",
                 run_id=None, params=None) -> Tracker:
    """Open (run_id None) or continue (run_id given) a run. Params are logged once, on a new run only:
    MLflow refuses a param re-logged with another value, so changes on resume belong in `set_tags`.
    Without `mlflow_uri`, MLflow uses `mlflow.db` and `mlartifacts/` beside the run folders.
    """
    if kind == "none":
        return Tracker(run_id)
    if kind not in ("mlflow", "wandb"):
        raise ValueError(f"tracker={kind!r} is not one of 'mlflow', 'wandb', 'none'")
    try:
        if kind == "mlflow" and mlflow_uri:
            tracker = MLflowTracker(mlflow_uri, run_name, run_id)
        elif kind == "mlflow":  # the experiment's artifact root, else MLflow scatters ./mlruns in the cwd
            root = Path(run_dir).parent.resolve()
            root.mkdir(parents=True, exist_ok=True)
            tracker = MLflowTracker(f"sqlite:///{root}/mlflow.db", run_name, run_id, (root / "mlartifacts").as_uri())
        else:
            tracker = WandbTracker(wandb_project, wandb_entity, run_name, run_dir, run_id, params)
    except Exception as e:
        _warn(kind, e)
        return Tracker(run_id)
    if tracker.new and params and kind == "mlflow":
        tracker.log_params(params)
    return tracker
