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
# # DCAL twins: evaluate
#
# Verification metrics of a checkpoint on a split: genuine vs twin impostor (the headline) and genuine vs
# general impostor, with ROC curves and score histograms. Writes `metrics.json`, `pairs.csv`,
# `embeddings.npz`, `roc.png`, `scores.png` and `attention/` (the hardest pairs) to `out`
# (default: `<run>/eval`).
#
# ```
# papermill notebooks/evaluate.ipynb runs/eval-out.ipynb \
#     -p checkpoint runs/dcal/checkpoints/best.pt -p data_dir /path/to/data
# ```

# %% tags=["parameters"]
checkpoint = "runs/dcal/checkpoints/best.pt"
data_dir = None  # the folder holding {train,test}_dataset_infor.json and {train,test}_twin_pairs.json
image_root = None  # where the images are, when the index's paths are from another machine
split = "test"  # test | train | val (the run's held-out sibling groups)
embedding = "sa+glca"  # sa+glca | sa | glca
batch_size = 64
gallery_n = 4  # pair views of the n hardest twin impostors and genuine pairs, in <out>/attention
out = None

# %%
from pathlib import Path

from IPython.display import Image, display

from dcal_lib.evaluate import evaluate_checkpoint, format_summary

metrics = evaluate_checkpoint(checkpoint, data_dir, image_root, split, out, embedding, batch_size,
                              gallery_n=gallery_n)
print(format_summary(metrics))

# %%
out_dir = Path(out or Path(checkpoint).parent.parent / "eval")
display(Image(filename=out_dir / "roc.png"), Image(filename=out_dir / "scores.png"))
