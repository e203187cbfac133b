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
# # DCAL twins: attention
#
# Where the model looks on two faces side by side: attention rollout, the patches GLCA selects and its
# read-out attention, and where the two faces' patch features differ; the suptitle gives the score against
# the checkpoint's threshold. By default the first two siblings of a twin group of the split; or any two
# images (`path_a`, `path_b`).
#
# ```
# papermill notebooks/attention_viz.ipynb runs/viz-out.ipynb \
#     -p checkpoint runs/dcal/checkpoints/best.pt -p data_dir /path/to/data -p group_index 3
# ```

# %% tags=["parameters"]
checkpoint = "runs/dcal/checkpoints/best.pt"
data_dir = None  # needed to pick a sibling group
image_root = None
split = "test"
group_index = 0  # a sibling group of the split, used when path_a and path_b are not given
path_a = None
path_b = None
embedding = "sa+glca"  # sa+glca | sa | glca: the score shown against the checkpoint's threshold
out = None  # a PNG path to save the figure to

# %%
# %matplotlib inline
from dcal_lib.data import load_split
from dcal_lib.explain import pair_view_from_checkpoint, sibling_pair_paths

if path_a is None:
    path_a, path_b = sibling_pair_paths(load_split(data_dir, split, image_root), group_index)
pair_view_from_checkpoint(checkpoint, path_a, path_b, out, embedding)
