"""Running inside a Kaggle kernel: where inputs and outputs live, the GPU check, secrets, and resuming.

A Kaggle session stops at 12 h. The next kernel version sees the previous version's /kaggle/working under
/kaggle/input (mount layouts vary), so continuing a run means finding that `last.pt` and copying it into
this session's run directory. The roots can be redirected with environment variables so tests can
simulate a session: DCAL_KAGGLE_INPUT, DCAL_KAGGLE_WORKING, DCAL_KAGGLE_MIN_GPUS.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dcal_lib.checkpoint import find_latest_checkpoint

DATA_INDEX = "train_dataset_infor.json"


def on_kaggle() -> bool:
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("DCAL_KAGGLE_INPUT"))


def input_root() -> Path:
    return Path(os.environ.get("DCAL_KAGGLE_INPUT", "/kaggle/input"))


def working_root() -> Path:
    return Path(os.environ.get("DCAL_KAGGLE_WORKING", "/kaggle/working"))


def require_gpus(n: int = 2) -> None:
    """Fail at the start rather than train for 12 h on the wrong machine (one GPU, or none at all)."""
    import torch

    n = int(os.environ.get("DCAL_KAGGLE_MIN_GPUS", n))
    count = torch.cuda.device_count()
    if count >= n:
        return
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count)) or "no CUDA GPU"
    raise RuntimeError(
        f"this Kaggle session sees {count} CUDA GPU(s) ({names}) but the run needs {n}: pick "
        '"GPU T4 x2" under Settings > Accelerator, or push with kernel-metadata.json '
        '"machine_shape": "NvidiaTeslaT4" using kaggle CLI >= 1.8.4 (older CLIs silently give a P100)'
    )


def wandb_key_from_secrets() -> str | None:
    """The WANDB_API_KEY secret attached to the kernel (Add-ons > Secrets), or None."""
    try:
        from kaggle_secrets import UserSecretsClient

        return UserSecretsClient().get_secret("WANDB_API_KEY") or None
    except Exception:  # not on Kaggle, secret not attached, or the secrets service is down
        return None


def find_data_dir() -> Path:
    """The folder holding the dataset index under the input mounts (its path differs between mounts)."""
    found = sorted(p.parent for p in input_root().rglob(DATA_INDEX))
    if not found:
        raise FileNotFoundError(
            f"no {DATA_INDEX} under {input_root()}: add the ND-TWIN dataset to the kernel "
            "(kernel-metadata.json dataset_sources) or pass data_dir explicitly"
        )
    if len(found) > 1:
        print(f"several datasets under {input_root()}: {', '.join(map(str, found))}; using {found[0]}")
    return found[0]


def import_previous_checkpoint(run_dir) -> Path | None:
    """Copy the newest `last.pt` under the input mounts (and its `best.pt`) to run_dir/checkpoints/.

    `best.pt` travels too: a resumed session writes one only when it improves on the best epoch, and each
    version's output is all the next version sees.
    """
    source = find_latest_checkpoint(input_root())
    if source is None:
        print(f"no previous last.pt under {input_root()}: starting a new run")
        return None
    target_dir = Path(run_dir) / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt"):  # last.pt last: its presence marks a complete import
        if (source.parent / name).is_file():
            tmp = target_dir / f".{name}.import.tmp"
            shutil.copyfile(source.parent / name, tmp)
            os.replace(tmp, target_dir / name)
            print(f"copied previous {name} from {source.parent / name} to {target_dir / name}")
    return target_dir / "last.pt"
