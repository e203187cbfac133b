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
# # DCAL twins: resume
#
# Continues a run with the settings it was trained with: from `checkpoint` when given (into `output_dir`
# when that is set too), else from `<output_dir>/checkpoints/last.pt`. Any other parameter set here
# overrides the stored one (raise `epochs` to train longer, point `data_dir`/`image_root` at this machine's
# copy of the data).
#
# ```
# papermill notebooks/resume.ipynb runs/resume-out.ipynb \
#     -p output_dir runs/dcal -p epochs 80
# ```

# %% tags=["parameters"]
checkpoint = None
output_dir = None
env = None
data_dir = None
image_root = None
tracker = None
mlflow_uri = None
epochs = None
max_hours = None
batch_size = None
num_workers = None

# %%
from dcal_lib.config import params_from_namespace
from dcal_lib.train import config_from_checkpoint, train

cfg = config_from_checkpoint(checkpoint, **params_from_namespace(globals()))
print(cfg)

# %%
print(train(cfg))
