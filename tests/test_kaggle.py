"""Kaggle glue, the kernel build/push script, and a simulated Kaggle session (temp folders as the roots)."""
import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from dcal_lib import kaggle
from dcal_lib.checkpoint import load_checkpoint, save_checkpoint
from dcal_lib.config import make_config
from dcal_lib.train import train

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("push_kaggle", REPO / "scripts" / "push_kaggle.py")
push_kaggle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(push_kaggle)

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, batch_size=16,
            images_per_id=2, val_groups=2, num_workers=0, tracker="none")


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch):
    """Simulated Kaggle roots; no real Kaggle variables leak in from the machine running the tests."""
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "DCAL_KAGGLE_MIN_GPUS"):
        monkeypatch.delenv(var, raising=False)
    roots = tmp_path / "input", tmp_path / "working"
    for root in roots:
        root.mkdir()
    monkeypatch.setenv("DCAL_KAGGLE_INPUT", str(roots[0]))
    monkeypatch.setenv("DCAL_KAGGLE_WORKING", str(roots[1]))
    return roots


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """A `kaggle` first on PATH that records its argv (a JSON list per line) and never touches the network."""
    bin_dir, log = tmp_path / "bin", tmp_path / "kaggle-calls.jsonl"
    bin_dir.mkdir()
    exe = bin_dir / "kaggle"
    exe.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:] == ['--version']:\n    print('Kaggle API ' + os.environ['FAKE_KAGGLE_VERSION'])\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KAGGLE_VERSION", "1.8.4")

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


@pytest.fixture
def metadata(tmp_path):
    """The repository's kernel-metadata.json with its placeholders filled in, as a user would edit it."""
    path = tmp_path / "kernel-metadata.json"
    path.write_text((REPO / "kernel-metadata.json").read_text().replace("your-kaggle-username", "alice"))
    return path


def injected_parameters(nb) -> dict:
    """The values papermill baked into a notebook, read back by evaluating the injected cell's assignments."""
    (cell,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body for t in node.targets}


# --- kaggle.py ---------------------------------------------------------------------------------------------

def test_roots_and_detection(monkeypatch):
    for var in ("KAGGLE_KERNEL_RUN_TYPE", "DCAL_KAGGLE_INPUT", "DCAL_KAGGLE_WORKING"):
        monkeypatch.delenv(var, raising=False)
    assert not kaggle.on_kaggle()
    assert kaggle.input_root() == Path("/kaggle/input") and kaggle.working_root() == Path("/kaggle/working")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert kaggle.on_kaggle()
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    monkeypatch.setenv("DCAL_KAGGLE_INPUT", "/tmp/in")
    monkeypatch.setenv("DCAL_KAGGLE_WORKING", "/tmp/out")
    assert kaggle.on_kaggle()
    assert kaggle.input_root() == Path("/tmp/in") and kaggle.working_root() == Path("/tmp/out")


def test_require_gpus_names_what_is_visible(monkeypatch):
    monkeypatch.delenv("DCAL_KAGGLE_MIN_GPUS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla P100-PCIE-16GB")
    with pytest.raises(RuntimeError, match=r"sees 1 CUDA GPU\(s\) \(Tesla P100-PCIE-16GB\).*NvidiaTeslaT4"):
        kaggle.require_gpus(2)
    kaggle.require_gpus(1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match=r"sees 0 CUDA GPU\(s\) \(no CUDA GPU\)"):
        kaggle.require_gpus()
    monkeypatch.setenv("DCAL_KAGGLE_MIN_GPUS", "0")
    kaggle.require_gpus()


def test_wandb_key_from_secrets(monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)  # not on Kaggle: the import fails
    assert kaggle.wandb_key_from_secrets() is None

    class Client:
        def get_secret(self, label):
            if label != "WANDB_API_KEY":
                raise KeyError(label)
            return secret

    monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=Client))
    secret = "k3y"
    assert kaggle.wandb_key_from_secrets() == "k3y"
    secret = ""
    assert kaggle.wandb_key_from_secrets() is None


def test_find_data_dir(kaggle_env):
    input_root = kaggle_env[0]
    with pytest.raises(FileNotFoundError, match="dataset_sources"):
        kaggle.find_data_dir()
    data = input_root / "datasets" / "alice" / "nd-twin" / "versions" / "2"
    data.mkdir(parents=True)
    (data / "train_dataset_infor.json").write_text("{}")
    (input_root / "datasets" / "alice" / "nd-twin" / "faces").mkdir()
    assert kaggle.find_data_dir() == data


def test_import_previous_checkpoint_takes_the_highest_epoch(kaggle_env, tmp_path):
    input_root = kaggle_env[0]
    run_dir = tmp_path / "working" / "runs" / "dcal"
    assert kaggle.import_previous_checkpoint(run_dir) is None
    assert not run_dir.exists()

    previous = input_root / "notebooks" / "alice" / "dcal-twins" / "runs" / "dcal" / "checkpoints"
    save_checkpoint(previous / "last.pt", {"epoch": 3, "marker": "previous"})
    save_checkpoint(previous / "best.pt", {"epoch": 2, "marker": "best"})
    save_checkpoint(input_root / "dcal-old" / "last.pt", {"epoch": 1, "marker": "older, written later"})

    got = kaggle.import_previous_checkpoint(run_dir)
    assert got == run_dir / "checkpoints" / "last.pt"
    assert (previous / "last.pt").read_bytes() == got.read_bytes()
    assert (previous / "best.pt").read_bytes() == (run_dir / "checkpoints" / "best.pt").read_bytes()
    assert sorted(p.name for p in got.parent.iterdir()) == ["best.pt", "last.pt"]


# --- kernel-metadata.json and scripts/push_kaggle.py -------------------------------------------------------

def test_repository_metadata_is_a_t4x2_notebook_kernel():
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    owner, slug = meta["id"].split("/")
    assert owner == "your-kaggle-username" and slug == "dcal-twins"
    assert meta["title"] == "DCAL Twins"  # Kaggle's slug of it: lowercase, spaces to hyphens
    assert meta["code_file"] == "train.ipynb" and meta["language"] == "python"
    assert meta["kernel_type"] == "notebook"
    assert meta["is_private"] is True and meta["enable_gpu"] is True and meta["enable_internet"] is True
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["dataset_sources"] == ["your-kaggle-username/nd-twin"]
    assert meta["kernel_sources"] == [] and meta["competition_sources"] == []


def test_dry_run_builds_a_valid_kernel(tmp_path, fake_kaggle, capsys):
    build = tmp_path / "build"
    push_kaggle.main(["--dry-run", "--build-dir", str(build), "--run-name", "exp1",
                      "-p", "epochs=30", "-p", "img_size=448", "-p", "use_pwca=false", "-p", "lr=1e-4"])
    printed = capsys.readouterr().out
    assert "warning: id 'your-kaggle-username/dcal-twins' still names" in printed
    assert "dry run: nothing pushed" in printed
    assert fake_kaggle() == [["--version"]]

    assert sorted(p.name for p in build.iterdir()) == ["kernel-metadata.json", "train.ipynb"]
    meta = json.loads((build / "kernel-metadata.json").read_text())
    template = json.loads((REPO / "kernel-metadata.json").read_text())
    assert meta == {**template, "kernel_sources": ["your-kaggle-username/dcal-twins"]}

    nb = nbformat.read(build / "train.ipynb", as_version=4)
    nbformat.validate(nb)
    assert injected_parameters(nb) == {"env": "kaggle", "run_name": "exp1", "epochs": 30, "img_size": 448,
                                       "use_pwca": False, "lr": 1e-4}
    source = nbformat.read(REPO / "notebooks" / "train.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "dcal-source" in code[0].metadata["tags"]
    assert "parameters" in code[1].metadata["tags"] and "injected-parameters" in code[2].metadata["tags"]
    assert [c.source for c in nb.cells if "dcal-" not in str(c.metadata.get("tags"))
            and "injected-parameters" not in c.metadata.get("tags", [])] == [c.source for c in source.cells]
    for key in ("kernel", "machine", "datasets", "inputs", "parameters", "code", "outputs"):
        assert f"\n{key:<11} " in "\n" + printed


def test_shipped_code_imports_from_the_notebook_alone(tmp_path, fake_kaggle):
    """Run the embedded-source cell in a fresh interpreter outside the repository: dcal_lib must come from
    the extracted copy (not the editable install), and that copy must be the checkout's, file for file."""
    build = tmp_path / "build"
    push_kaggle.main(["--dry-run", "--build-dir", str(build)])
    nb = nbformat.read(build / "train.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if "dcal-source" in c.metadata.get("tags", []))
    probe = cell + (
        "\nimport json\nimport dcal_lib.kaggle\n"
        "print(json.dumps({'dir': _code_dir, 'version': os.environ['DCAL_CODE_VERSION'], 'files': ["
        "m.__file__ for m in (dcal_lib, dcal_lib.kaggle, dcal_lib.checkpoint, dcal_lib.kaggle.os)]}))\n"
    )
    run = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    code_dir = Path(got["dir"])
    assert [Path(f).relative_to(code_dir).as_posix() for f in got["files"][:3]] == [
        "dcal_lib/__init__.py", "dcal_lib/kaggle.py", "dcal_lib/checkpoint.py"]
    assert not Path(got["files"][3]).is_relative_to(code_dir)  # the standard library is not shadowed
    shipped = {p.relative_to(code_dir): p.read_bytes() for p in code_dir.rglob("*.py")}
    checkout = {p.relative_to(REPO): p.read_bytes() for p in (REPO / "dcal_lib").rglob("*.py")}
    assert shipped == checkout
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert got["version"].split("-")[0] == head.stdout.strip()


@pytest.mark.parametrize("args, kernel_sources, extra_datasets", [
    ([], ["alice/dcal-twins"], []),
    (["--fresh"], [], []),
    (["--resume-from", "alice/dcal-twins-s1"], ["alice/dcal-twins-s1"], []),
    (["--resume-from", "dataset:alice/dcal-ckpt"], [], ["alice/dcal-ckpt"]),
])
def test_push_wires_the_previous_output_and_calls_kaggle(tmp_path, fake_kaggle, metadata, args,
                                                         kernel_sources, extra_datasets):
    build = tmp_path / "build"
    push_kaggle.main(["--metadata", str(metadata), "--build-dir", str(build), *args])
    assert fake_kaggle() == [["--version"], ["kernels", "push", "-p", str(build)]]
    meta = json.loads((build / "kernel-metadata.json").read_text())
    assert meta["id"] == "alice/dcal-twins"
    assert meta["kernel_sources"] == kernel_sources
    assert meta["dataset_sources"] == ["alice/nd-twin", *extra_datasets]


@pytest.mark.parametrize("version, ok", [("1.8.3", False), ("1.6.17", False), ("1.8.4", True), ("2.0", True)])
def test_kaggle_cli_version_gate(tmp_path, fake_kaggle, metadata, monkeypatch, version, ok):
    monkeypatch.setenv("FAKE_KAGGLE_VERSION", version)
    argv = ["--metadata", str(metadata), "--build-dir", str(tmp_path / "build")]
    if ok:
        push_kaggle.main(argv)
        assert fake_kaggle()[-1][:2] == ["kernels", "push"]
    else:
        with pytest.raises(SystemExit, match=rf"version {version}(\.0)?; machine_shape needs >= 1\.8\.4"):
            push_kaggle.main(argv)
        assert fake_kaggle() == [["--version"]]


@pytest.mark.parametrize("edit, argv, message", [
    ({"title": "DCAL"}, [], "shorter than 5 characters"),
    ({"title": "Twins DCAL"}, [], "slugifies to 'twins-dcal'"),
    ({"id": "alice-dcal-twins"}, [], "is not OWNER/slug"),
    ({"machine_shape": ""}, [], "NvidiaTeslaT4"),
    ({"enable_internet": "yes"}, [], "enable_internet must be set explicitly"),
    ({"code_file": "train.py"}, [], r"expected the notebook's file name \(\*\.ipynb\)"),
    ({"dataset_sources": ["your-kaggle-username/nd-twin"]}, [], "still names 'your-kaggle-username'"),
    ({}, ["-p", "epochs=many"], "epochs='many': expected int"),
    ({}, ["-p", "colour=red"], "unknown parameter"),
    ({}, ["-p", "env=server"], "env is always kaggle"),
])
def test_push_refuses_what_kaggle_would_reject(tmp_path, fake_kaggle, metadata, edit, argv, message):
    meta = {**json.loads(metadata.read_text()), **edit}
    metadata.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=message):
        push_kaggle.main(["--metadata", str(metadata), "--build-dir", str(tmp_path / "build"), *argv])
    assert ["kernels", "push", "-p", str(tmp_path / "build")] not in fake_kaggle()


# --- a simulated Kaggle session ------------------------------------------------------------------------------

def test_built_kernel_resumes_from_the_previous_version_output(tmp_path, kaggle_env, demo_data, fake_kaggle,
                                                               monkeypatch):
    """Version N+1 of the kernel, run as pushed: it finds version N's last.pt in a nested input mount and the
    dataset by searching, trains the next epoch only, and writes the newer last.pt to the working folder."""
    input_root, working = kaggle_env
    with monkeypatch.context() as m:  # version N, as an ordinary one-epoch run
        m.delenv("DCAL_KAGGLE_INPUT")
        previous = train(make_config(**TINY, epochs=1, data_dir=str(demo_data), output_dir=str(tmp_path / "prev")))
    state = load_checkpoint(previous["checkpoint"])
    state["history"][0]["session"] = "version N"  # tells the imported epoch from a retrained one
    mounted = input_root / "notebooks" / "alice" / "dcal-twins" / "runs" / "dcal" / "checkpoints" / "last.pt"
    save_checkpoint(mounted, state)
    save_checkpoint(input_root / "dcal-twins-old" / "last.pt", {**state, "epoch": 0})
    data_dir = input_root / "datasets" / "alice" / "nd-twin" / "versions" / "1"
    shutil.copytree(demo_data, data_dir)

    build = tmp_path / "build"
    overrides = [arg for k, v in {**TINY, "epochs": 2}.items() for arg in ("-p", f"{k}={v}")]
    push_kaggle.main(["--dry-run", "--build-dir", str(build), *overrides])
    cell = next(c.source for c in nbformat.read(build / "train.ipynb", as_version=4).cells
                if "dcal-source" in c.metadata.get("tags", []))
    version = re.search(r'os.environ\["DCAL_CODE_VERSION"\] = "(.+)"', cell).group(1)
    monkeypatch.setenv("DCAL_KAGGLE_MIN_GPUS", "0")  # the CPU stands in for the two T4s
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the kernel extracts the shipped dcal_lib
    nb = papermill.execute_notebook(build / "train.ipynb", tmp_path / "kernel-out.ipynb", cwd=working,
                                    kernel_name="python3", progress_bar=False)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    assert f"dcal_lib {version} from {tmp_path}/dcal_lib_" in printed
    assert f"copied previous last.pt from {mounted}" in printed
    run_dir = working / "runs" / "dcal"
    new = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert new["epoch"] == 2 and new["global_step"] == 2 * state["global_step"]
    assert [h.get("session") for h in new["history"]] == ["version N", None]
    assert new["config"]["env"] == "kaggle" and new["config"]["data_dir"] == str(data_dir)
    assert new["code_version"] == version
    assert load_checkpoint(mounted)["epoch"] == 1  # the input is left as it was
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["split"] == "test"
