"""The command line as a user types it: real subprocesses, exit codes and printed summaries."""
import json
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dcal_lib", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_make_demo_data_then_check_data(tmp_path):
    made = cli("make-demo-data", "--out", tmp_path / "d")
    assert made.returncode == 0, made.stderr
    checked = cli("check-data", "--data-dir", tmp_path / "d", "--verify-images")
    assert checked.returncode == 0, checked.stderr
    assert "train" in checked.stdout and "test" in checked.stdout and "images decode" in checked.stdout


def test_check_data_error_exits_1_with_the_file_named(tmp_path):
    assert cli("make-demo-data", "--out", tmp_path).returncode == 0
    (tmp_path / "test_twin_pairs.json").write_text('[["95001", "95001"]]')
    out = cli("check-data", "--data-dir", tmp_path)
    assert out.returncode == 1 and "test_twin_pairs.json" in out.stderr and "Traceback" not in out.stderr


def test_train_rejects_unknown_and_ill_typed_parameters(tmp_path):
    out = cli("train", "--data_dir", tmp_path, "--epochs", "three")
    assert out.returncode == 1 and "epochs" in out.stderr
    assert cli("train", "--bogus", "1").returncode == 2  # argparse names the unknown option


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_data):
    run = tmp_path_factory.mktemp("cli") / "run"
    out = cli("train", "--data_dir", demo_data, "--output_dir", run, "--backbone", "vit_tiny_patch16_224",
              "--pretrained", "false", "--img_size", 32, "--depth", 2, "--epochs", 1, "--batch_size", 16,
              "--images_per_id", 2, "--val_groups", 2, "--num_workers", 0, "--amp", "false")
    assert out.returncode == 0, out.stderr
    return run


def test_evaluate_and_verify(trained_run, demo_data, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.pt"
    out = cli("evaluate", "--checkpoint", ckpt, "--data-dir", demo_data, "--out", tmp_path / "eval", "--gallery", 1)
    assert out.returncode == 0, out.stderr
    assert "Twin (" in out.stdout and json.loads((tmp_path / "eval" / "metrics.json").read_text())["twin"]["auc"]
    info = json.loads((demo_data / "test_dataset_infor.json").read_text())
    pairs = json.loads((demo_data / "test_twin_pairs.json").read_text())
    a, b = pairs[0]
    for img_a, img_b in ((info[a][0], info[a][1]), (info[a][0], info[b][0])):
        v = cli("verify", "--checkpoint", ckpt, img_a, img_b, "--out", tmp_path / "pair.png")
        assert v.returncode == 0, v.stderr
        assert "score" in v.stdout and ("same person" in v.stdout or "different people" in v.stdout)
        assert (tmp_path / "pair.png").stat().st_size > 10_000
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    v = cli("verify", "--checkpoint", ckpt, bad, info[a][0])
    assert v.returncode == 1 and "broken.jpg" in v.stderr
