# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DCAL twins: train
#
# Trains DCAL on the twin data, then evaluates the best checkpoint on the test split.
# The parameters are the `Config` names of `dcal_lib/config.py`; `None` keeps the `env` preset's value.
# From the repository root:
#
# ```
# papermill notebooks/train.ipynb runs/train-out.ipynb \
#     -p env server -p data_dir /path/to/data -p image_root /path/to/images
# ```
#
# With `resume = "auto"` (the default) an interrupted run continues from `<output_dir>/checkpoints/last.pt`;
# on Kaggle from the newest `last.pt` among the kernel's inputs.

# %% tags=["parameters"]
env = "local"
data_dir = None
image_root = None
output_dir = None
run_name = None
tracker = None
mlflow_uri = None
wandb_project = None
wandb_entity = None
backbone = None
pretrained = None
pretrained_path = None
img_size = None
depth = None
drop_path = None
use_glca = None
use_pwca = None
glca_ratio = None
glca_readout = None
pwca_partner = None
id_loss = None
epochs = None
batch_size = None
images_per_id = None
lr = None
weight_decay = None
warmup_epochs = None
amp = None
grad_ckpt = None
val_groups = None
resume = None
max_hours = None
seed = None
num_workers = None

# %%
from dcal_lib.config import from_namespace
from dcal_lib.evaluate import evaluate_checkpoint, format_summary
from dcal_lib.train import train

cfg = from_namespace(globals())
print(cfg)

# %%
result = train(cfg)
print(result)

# %%
metrics = evaluate_checkpoint(result["best_checkpoint"], cfg.data_dir, cfg.image_root or None)
print(format_summary(metrics))
