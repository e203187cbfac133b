"""Every run parameter in one dataclass, with presets for the places the project runs.

The same names are used by the notebooks' `parameters` cell (papermill `-p name value`) and by
`python -m dcal_lib train --name value`. Precedence: dataclass default < env preset < explicit value.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

CHOICES = {
    "env": ("local", "server", "kaggle"),
    "tracker": ("none", "mlflow", "wandb"),
    "glca_readout": ("mean", "cls"),
    "pwca_partner": ("random", "twin"),
    "id_loss": ("cosface", "softmax"),
}


@dataclass
class Config:
    env: str = "local"
    # data and outputs
    data_dir: str = ""
    image_root: str = ""  # where the images really are when the index's paths are from another machine
    output_dir: str = ""  # "" = <runs root>/<run_name>
    run_name: str = "dcal"
    # tracking
    tracker: str = "none"
    mlflow_uri: str = ""  # "" = a sqlite store beside the run directories
    wandb_project: str = "dcal-twins"
    wandb_entity: str = ""
    # model
    backbone: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    pretrained_path: str = ""  # local weights file for machines without hub access
    img_size: int = 224
    depth: int = 0  # 0 = the backbone's own depth; smaller builds the tiny CPU demo/test models
    drop_path: float = 0.1
    use_glca: bool = True
    use_pwca: bool = True
    glca_ratio: float = 0.1
    glca_readout: str = "mean"
    pwca_partner: str = "random"
    id_loss: str = "cosface"
    # optimisation
    epochs: int = 60
    batch_size: int = 32  # images per step over all GPUs
    images_per_id: int = 4
    lr: float = 0.0  # 0 = the paper's scaling, 5e-4 / 512 * batch_size
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    amp: bool = True  # fp16 + GradScaler on sm < 8.0, bf16 on newer GPUs and on CPU
    grad_ckpt: bool = False  # recompute block activations in backward: 448 px on 11-16 GB cards
    # run control
    val_groups: int = 20  # sibling groups held out for per-epoch validation; 0 = train on everything
    resume: str = "auto"  # "auto" | "" (fresh) | path to a checkpoint
    max_hours: float = 0.0  # 0 = no time budget
    seed: int = 0
    num_workers: int = -1  # -1 = every CPU core

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def base_lr(self) -> float:
        return self.lr or 5e-4 / 512 * self.batch_size


def _kaggle_working() -> Path:
    return Path(os.environ.get("DCAL_KAGGLE_WORKING", "/kaggle/working"))


PRESETS: dict[str, dict] = {
    "local": {"tracker": "none", "batch_size": 16},
    "server": {"tracker": "mlflow", "mlflow_uri": "http://127.0.0.1:5000", "batch_size": 32},
    "kaggle": {
        "tracker": "wandb",
        "wandb_entity": "hunchoquavodb-hanoi-university-of-science-and-technology",
        "batch_size": 32,
        "max_hours": 11.25,  # Kaggle stops a session at 12 h; leave time for the last save and evaluation
        "num_workers": 4,
    },
}

FIELDS = {f.name: f for f in fields(Config)}


class ConfigError(ValueError):
    pass


def _coerce(name: str, value):
    """Accept typed values (papermill, Python) and strings (command line)."""
    kind = type(FIELDS[name].default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigError(f"parameter {name}={value!r}: expected {kind.__name__}")


def make_config(**params) -> Config:
    """Build a validated Config: defaults, then the env preset, then `params`."""
    unknown = sorted(set(params) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    env = params.get("env", "local")
    if env not in PRESETS:
        raise ConfigError(f"parameter env={env!r}: expected one of {', '.join(PRESETS)}")
    values = {**PRESETS[env], **params}
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"parameter {name}={getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    positive = ("img_size", "epochs", "batch_size", "images_per_id")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"parameter {name}={getattr(cfg, name)} must be positive")
    if not 0 < cfg.glca_ratio <= 1:
        raise ConfigError(f"parameter glca_ratio={cfg.glca_ratio} must be in (0, 1]")
    if not cfg.output_dir:
        root = _kaggle_working() / "runs" if cfg.env == "kaggle" else Path("runs")
        cfg.output_dir = str(root / cfg.run_name)
    return cfg


def params_from_namespace(namespace: dict) -> dict:
    """The config names a notebook's globals bind to a value other than None (papermill parameters)."""
    return {k: v for k, v in namespace.items() if k in FIELDS and v is not None}


def from_namespace(namespace: dict) -> Config:
    return make_config(**params_from_namespace(namespace))


def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
