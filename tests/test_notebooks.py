"""The notebooks: py/ipynb pairs in sync, parameters matching the library, and each one run with papermill."""
import ast
import inspect
import json
from pathlib import Path

import jupytext
import papermill
import pytest
from PIL import Image

from dcal_lib.checkpoint import load_checkpoint
from dcal_lib.config import FIELDS
from dcal_lib.evaluate import evaluate_checkpoint, format_summary

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["train", "resume", "evaluate", "attention_viz"]
TINY = dict(env="local", backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, epochs=1,
            batch_size=16, images_per_id=2, val_groups=2, num_workers=0)


def cells(path: Path) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in jupytext.read(path).cells]


def parameters(name: str) -> dict:
    (cell,) = [c for c in jupytext.read(NOTEBOOKS / f"{name}.py").cells if "parameters" in c.metadata.get("tags", [])]
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body for t in node.targets}


def run(name: str, out_dir: Path, **params) -> str:
    """Execute a notebook from a temp working directory; return everything its cells printed."""
    nb = papermill.execute_notebook(NOTEBOOKS / f"{name}.ipynb", out_dir / f"{name}-out.ipynb", parameters=params,
                                    cwd=out_dir, kernel_name="python3", progress_bar=False)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def image_outputs(path: Path) -> int:
    nb = json.loads(path.read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


# --- the files themselves ----------------------------------------------------------------------------------

def test_every_notebook_is_a_pair():
    assert sorted(p.name for p in NOTEBOOKS.iterdir() if p.suffix in (".py", ".ipynb")) == sorted(
        f"{n}{s}" for n in NAMES for s in (".py", ".ipynb"))


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
    """The .py is the file people edit; `jupytext --sync notebooks/*.py` must have been run after it."""
    assert cells(NOTEBOOKS / f"{name}.py") == cells(NOTEBOOKS / f"{name}.ipynb"), (
        f"notebooks/{name}.py and .ipynb differ: run jupytext --sync notebooks/{name}.py")
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    assert all(not c.get("outputs") for c in nb["cells"]), f"notebooks/{name}.ipynb is committed with outputs"
    for path in (NOTEBOOKS / f"{name}.py", NOTEBOOKS / f"{name}.ipynb"):
        assert jupytext.read(path).metadata["kernelspec"]["name"] == "python3"  # papermill's kernel and language


@pytest.mark.parametrize("name", NAMES)
def test_notebook_shape_title_parameters_and_no_logic(name):
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# DCAL twins: ")
    assert nb.cells[1].metadata.get("tags") == ["parameters"]
    for cell in nb.cells[2:]:
        if cell.cell_type == "code":
            python = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))
            kinds = {type(n).__name__ for n in ast.walk(ast.parse(python))}
            assert not kinds & {"FunctionDef", "ClassDef", "For", "While", "Lambda"}, (name, cell.source)


def test_train_and_resume_parameters_are_the_config_names():
    assert parameters("train") == {"env": "local"} | {name: None for name in FIELDS if name != "env"}
    resume = parameters("resume")
    assert resume["checkpoint"] is None and set(resume) - {"checkpoint"} <= set(FIELDS) - {"resume"}
    assert all(v is None for v in resume.values())  # None = the value stored in the checkpoint


def test_evaluate_parameters_are_evaluate_checkpoint_arguments():
    arguments = set(inspect.signature(evaluate_checkpoint).parameters) - {"device"}
    assert set(parameters("evaluate")) == arguments


def test_attention_viz_parameters():
    assert set(parameters("attention_viz")) == {"checkpoint", "data_dir", "image_root", "split", "group_index",
                                                "path_a", "path_b", "embedding", "out"}


# --- papermill runs (env=local, tiny model, the synthetic data) --------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """The train notebook run once: one epoch into <tmp>/run, then its evaluation."""
    work = tmp_path_factory.mktemp("train-nb")
    printed = run("train", work, **TINY, data_dir=str(demo_data), output_dir=str(work / "run"))
    return work / "run", printed


def test_train_notebook(trained):
    run_dir, printed = trained
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    best = run_dir / "checkpoints" / ("best.pt" if (run_dir / "checkpoints" / "best.pt").exists() else "last.pt")
    assert metrics["checkpoint"] == str(best) and metrics["split"] == "test"
    assert format_summary(metrics) in printed
    for png in ("roc.png", "scores.png"):
        assert Image.open(run_dir / "eval" / png).format == "PNG"


def test_resume_notebook_continues_a_given_checkpoint(trained, tmp_path, demo_data):
    """checkpoint=<last.pt> continued into a new run directory (checkpoint=None, resume="auto" on output_dir,
    is the train notebook's own default, exercised by the simulated Kaggle session in test_kaggle.py)."""
    before = load_checkpoint(trained[0] / "checkpoints" / "last.pt")
    printed = run("resume", tmp_path, **{**TINY, "epochs": 2}, data_dir=str(demo_data),
                  checkpoint=str(trained[0] / "checkpoints" / "last.pt"), output_dir=str(tmp_path / "run"))
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert f"after epoch 1 (step {before['global_step']})" in printed
    assert after["epoch"] == 2 and after["global_step"] == 2 * before["global_step"]
    assert after["history"][0] == before["history"][0]


def test_evaluate_notebook(trained, tmp_path, demo_data):
    checkpoint = trained[0] / "checkpoints" / "last.pt"
    printed = run("evaluate", tmp_path, checkpoint=str(checkpoint), data_dir=str(demo_data), split="val",
                  embedding="sa", batch_size=8, gallery_n=1, out=str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["split"], metrics["embedding"], metrics["epoch"]) == (
        str(checkpoint), "val", "sa", 1)
    assert format_summary(metrics) in printed
    assert image_outputs(tmp_path / "evaluate-out.ipynb") == 2  # the ROC and score plots, shown inline
    assert len(list((tmp_path / "eval" / "attention").glob("*.png"))) == 2  # hardest twin, hardest genuine


def test_attention_viz_notebook(trained, tmp_path, demo_data):
    checkpoint = trained[0] / "checkpoints" / "last.pt"
    run("attention_viz", tmp_path, checkpoint=str(checkpoint), data_dir=str(demo_data), group_index=1,
        out=str(tmp_path / "pair.png"))
    assert Image.open(tmp_path / "pair.png").format == "PNG"
    assert image_outputs(tmp_path / "attention_viz-out.ipynb") == 1
