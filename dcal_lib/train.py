"""The training loop, top to bottom: data, model, optimiser, epochs, validation, checkpoints.

A run lives in `cfg.run_dir`; `checkpoints/last.pt` is written after every epoch and holds all
that is needed to continue bit-for-bit (RNG states included), so a run cut off by Kaggle's 12-hour
limit, a crash or a kill continues where its last completed epoch ended.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import kaggle
from .checkpoint import load_checkpoint, save_checkpoint, unwrap_state_dict
from .config import Config, ConfigError, config_dict, make_config
from .data import FaceDataset, TwinBatchSampler, build_transform, load_split, split_val
from .evaluate import evaluate_split
from .model import build_model, create_backbone, data_config
from .tracking import make_tracker

HEAD_LR_MULT = 10.0  # new, randomly initialised heads learn faster than the pretrained trunk
MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run is stopped
LOG_EVERY = 10


def code_version() -> str:
    """The git commit of the code (the Kaggle push records it in DCAL_CODE_VERSION)."""
    if os.environ.get("DCAL_CODE_VERSION"):
        return os.environ["DCAL_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """fp16 on Turing (T4, 2080 Ti: bf16 is emulated there although torch reports it), bf16 elsewhere."""
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16


def param_groups(model, cfg: Config) -> list[dict]:
    """No weight decay on norms, biases, tokens and loss weights; a higher lr for the new heads."""
    groups = {(d, h): [] for d in (True, False) for h in (True, False)}
    for name, p in model.named_parameters():
        head = name.startswith(("sa_head", "glca_head", "loss_log_vars"))
        decay = p.ndim > 1 and not name.startswith("loss_log_vars") and "token" not in name and "pos_embed" not in name
        groups[decay, head].append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if d else 0.0,
             "lr": cfg.base_lr * (HEAD_LR_MULT if h else 1.0)} for (d, h), ps in groups.items() if ps]


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check(cfg: Config) -> None:
    """Everything that can be known wrong before a minute is spent."""
    if not cfg.data_dir:
        raise ConfigError("parameter data_dir is empty: point it at the folder with train_dataset_infor.json")
    index = Path(cfg.data_dir) / "train_dataset_infor.json"
    if not index.is_file():
        raise ConfigError(f"data_dir={cfg.data_dir!r}: {index} not found; data_dir must hold the four JSON files")
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        raise ConfigError(f"image_root={cfg.image_root!r} is not a folder")
    if cfg.pretrained_path and not Path(cfg.pretrained_path).is_file():
        raise ConfigError(f"pretrained_path={cfg.pretrained_path!r} is not a file")
    create_backbone(cfg, meta=True)


def resolve_resume(cfg: Config) -> dict | None:
    """The checkpoint state to continue from, or None for a fresh run."""
    last = cfg.run_dir / "checkpoints" / "last.pt"
    if cfg.resume == "auto":
        if not last.exists() and kaggle.on_kaggle():
            kaggle.import_previous_checkpoint(cfg.run_dir)
        return load_checkpoint(last) if last.exists() else None
    if cfg.resume == "":
        if last.exists():
            raise ConfigError(f"{last} exists and resume='': continue it with resume='auto', or start a new run "
                              "with another run_name or output_dir")
        return None
    return load_checkpoint(cfg.resume)


def config_from_checkpoint(checkpoint=None, **overrides) -> Config:
    """The config a checkpoint was trained with, with `overrides`, set to continue from that file.

    Without `checkpoint`, the run in `overrides["output_dir"]` continues from its own last.pt.
    """
    if not checkpoint and not overrides.get("output_dir"):
        raise ConfigError("give checkpoint (a .pt file) or output_dir (a run folder) to resume from")
    path = Path(checkpoint or Path(overrides["output_dir"]) / "checkpoints" / "last.pt")
    stored = load_checkpoint(path, mmap=True)["config"]
    return make_config(**{**stored, **overrides, "resume": str(path)})


def changed_params(old: dict, new: dict) -> dict[str, str]:
    return {f"resume.{k}": f"{old.get(k)!r} -> {v!r}" for k, v in new.items() if k != "resume" and old.get(k) != v}


def out_of_time(elapsed: float, epoch_seconds: float, cfg: Config) -> bool:
    """True when another epoch (plus 10 % slack) would overrun the time budget."""
    return cfg.max_hours > 0 and elapsed + 1.1 * epoch_seconds > cfg.max_hours * 3600


def train(cfg: Config) -> dict:
    """Train (or continue) the run in `cfg.run_dir`; return where it ended and its best validation EER."""
    if kaggle.on_kaggle():
        kaggle.require_gpus(2)
        if not cfg.data_dir:
            cfg.data_dir = str(kaggle.find_data_dir())
    check(cfg)
    state = resolve_resume(cfg)
    ckpt_dir = cfg.run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    full = load_split(cfg.data_dir, "train", cfg.image_root or None)
    train_split, val_split = split_val(full, cfg.val_groups, cfg.seed)
    # a resumed run takes its weights from the checkpoint: fetching the pretrained ones would be wasted
    model_cfg = dataclasses.replace(cfg, pretrained=False, pretrained_path="") if state else cfg
    model = build_model(model_cfg, num_classes=len(train_split.ids)).to(device)
    dcfg = data_config(model)
    sampler = TwinBatchSampler(train_split, cfg.batch_size, cfg.images_per_id, cfg.seed)
    workers = os.cpu_count() if cfg.num_workers < 0 else cfg.num_workers
    loader = DataLoader(FaceDataset(train_split.samples(), build_transform(dcfg, cfg.img_size, train=True)),
                        batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    eval_tf = build_transform(dcfg, cfg.img_size, train=False)

    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.base_lr)
    steps_per_epoch = len(sampler)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start_epoch, step, best_eer, threshold, history = 0, 0, float("inf"), None, []
    if state is not None:
        if state["num_classes"] != len(train_split.ids):
            raise ConfigError(f"the checkpoint was trained on {state['num_classes']} identities but the training "
                              f"split now has {len(train_split.ids)} (other data_dir or val_groups?): resume with "
                              "the run's data, or start a new run (another output_dir, resume='')")
        model.load_state_dict(unwrap_state_dict(state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        start_epoch, step, best_eer = state["epoch"], state["global_step"], state["best_eer"]
        threshold, history = state["threshold"], state["history"]
        print(f"resuming {cfg.run_dir} after epoch {start_epoch} (step {step})")
    net = nn.DataParallel(model) if torch.cuda.device_count() > 1 else model

    tracker = make_tracker(cfg.tracker, run_name=cfg.run_name, run_dir=cfg.run_dir, mlflow_uri=cfg.mlflow_uri,
                           wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity,
                           run_id=state and state.get("tracker_run_id"),
                           params=None if state else config_dict(cfg))
    if state is not None and (changes := changed_params(state["config"], config_dict(cfg))):
        tracker.set_tags(changes)

    print(f"training {cfg.backbone} on {device} x{max(1, torch.cuda.device_count())} ({dtype or 'fp32'}): "
          f"{len(train_split.ids)} ids, {sum(map(len, train_split.images.values()))} images, "
          f"{steps_per_epoch} steps/epoch; validation on {0 if val_split is None else len(val_split.ids)} ids")
    t_start, epoch_times, bad_steps, stopped_early = time.monotonic(), [], 0, False
    result = {"run_dir": str(cfg.run_dir), "checkpoint": str(ckpt_dir / "last.pt")}
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.monotonic()
        sampler.set_epoch(epoch)
        net.train()
        losses, n_images = [], 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for images, labels, groups in bar:
            images = images.to(device, non_blocking=True)
            labels, groups = labels.to(device, non_blocking=True), groups.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = {k: v.float().mean() for k, v in net(images, labels, groups).items()}
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(out["loss"]):
                bad_steps += 1
                if bad_steps >= MAX_BAD_STEPS:
                    raise FloatingPointError(f"loss was not finite for {bad_steps} steps in a row (step {step}): "
                                             f"lower lr, or set amp=False; {ckpt_dir / 'last.pt'} is intact")
                continue
            bad_steps = 0
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            n_images += len(images)
            losses.append(out["loss"].item())
            rate = n_images / (time.monotonic() - t_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{rate:.1f}")
            if step % LOG_EVERY == 0:
                tracker.log_metrics({f"train/{k}": v.item() for k, v in out.items()}
                                    | {"train/lr": scheduler.get_last_lr()[0]}, step)

        metrics = {"epoch": epoch + 1, "train/loss_epoch": float(np.mean(losses)) if losses else float("nan"),
                   "train/images_per_s": n_images / (time.monotonic() - t_epoch)}
        if val_split is not None:
            val = evaluate_split(model, val_split, eval_tf, device, batch_size=cfg.batch_size)
            metrics |= {f"val/twin_{k}": val["twin"][k] for k in ("eer", "auc")} | {"val/all_eer": val["all"]["eer"]}
            threshold = val["twin"]["eer_threshold"]
        history.append(metrics)
        improved = val_split is not None and metrics["val/twin_eer"] < best_eer
        best_eer = metrics["val/twin_eer"] if improved else best_eer
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                "global_step": step, "rng": rng_state(), "sampler": sampler.state_dict(), "best_eer": best_eer,
                "threshold": threshold, "config": config_dict(cfg), "num_classes": len(train_split.ids),
                "tracker_run_id": tracker.run_id, "code_version": code_version(), "history": history}
        save_checkpoint(ckpt_dir / "last.pt", ckpt)
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", ckpt)
        tracker.log_metrics(metrics, step)
        epoch_times.append(time.monotonic() - t_epoch)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
              + (" | best" if improved else ""))
        if epoch + 1 < cfg.epochs and out_of_time(time.monotonic() - t_start, max(epoch_times), cfg):
            print(f"time budget of {cfg.max_hours} h: stopped after epoch {epoch + 1}/{cfg.epochs}. "
                  f"Continue with resume='auto' and output_dir={cfg.run_dir} (on Kaggle: push the kernel again)")
            stopped_early = True
            break
    tracker.finish()
    best = ckpt_dir / "best.pt"
    return result | {"epoch": state["epoch"] if state and start_epoch >= cfg.epochs else epoch + 1,
                     "best_eer": best_eer, "best_checkpoint": str(best if best.exists() else ckpt_dir / "last.pt"),
                     "stopped_early": stopped_early}
