import csv
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dcal_lib.checkpoint import save_checkpoint
from dcal_lib.config import config_dict, make_config
from dcal_lib.data import build_transform, load_split, split_val
from dcal_lib.evaluate import evaluate_checkpoint, evaluate_split, format_summary
from dcal_lib.model import build_model, data_config

METRIC_KEYS = {"auc", "eer", "eer_threshold", "tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3",
               "accuracy", "accuracy_std", "n_genuine", "n_impostor"}


def tiny_checkpoint(run_dir: Path, data_dir, threshold=0.5) -> Path:
    cfg = make_config(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                      data_dir=str(data_dir), val_groups=2)
    num_classes = len(load_split(data_dir, "train").ids)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes)
    path = run_dir / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config_dict(cfg),
                           "num_classes": num_classes, "epoch": 3, "threshold": threshold})
    return path


def test_evaluate_checkpoint_writes_consistent_outputs(demo_data, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run", demo_data)
    metrics = evaluate_checkpoint(ckpt, demo_data, device="cpu", gallery_n=1)
    out = tmp_path / "run" / "eval"
    for name in ("metrics.json", "pairs.csv", "embeddings.npz", "roc.png", "scores.png"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name.split("_score")[0] for p in (out / "attention").glob("*.png")) == [
        "genuine_01", "twin_impostor_01"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for kind in ("twin", "general", "all"):
        assert set(saved[kind]) == METRIC_KEYS
    assert (saved["checkpoint"], saved["epoch"], saved["embedding"], saved["split"]) == (
        str(ckpt), 3, "sa+glca", "test")

    # expected pair counts straight from the split's id lists, not from the pair builder
    split = load_split(demo_data, "test")
    n_gen = sum(comb(len(p), 2) for p in split.images.values())
    n_twin = sum(len(split.images[a]) * len(split.images[b])
                 for g in split.groups for i, a in enumerate(g) for b in g[i + 1:])
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    kinds = [r["kind"] for r in rows]
    assert (kinds.count("genuine"), kinds.count("twin"), kinds.count("general")) == (n_gen, n_twin, n_gen)
    assert (saved["twin"]["n_genuine"], saved["twin"]["n_impostor"]) == (n_gen, n_twin)
    assert saved["all"]["n_impostor"] == n_twin + n_gen

    emb = np.load(out / "embeddings.npz")
    assert len(emb["paths"]) == sum(map(len, split.images.values()))
    assert np.allclose(np.linalg.norm(emb["embeddings"], axis=1), 1.0, atol=1e-5)
    assert all(Path(p).parent.name == i for i, p in zip(emb["ids"], emb["paths"], strict=True))

    # each row: the kind follows from the two ids, the score is the cosine of the saved embeddings
    vec = dict(zip(emb["paths"].tolist(), emb["embeddings"], strict=True))
    id_of = dict(zip(emb["paths"].tolist(), emb["ids"].tolist(), strict=True))
    group_of = split.group_of
    for r in rows:
        a, b = id_of[r["path_a"]], id_of[r["path_b"]]
        expected = "genuine" if a == b else "twin" if group_of[a] == group_of[b] else "general"
        assert r["kind"] == expected
        assert float(r["score"]) == pytest.approx(float(vec[r["path_a"]] @ vec[r["path_b"]]), abs=2e-6)

    scores = np.array([float(r["score"]) for r in rows])
    kinds = np.array(kinds)
    twin = kinds != "general"
    reference_auc = roc_auc_score(kinds[twin] == "genuine", scores[twin])
    assert saved["twin"]["auc"] == pytest.approx(reference_auc, abs=1e-4)
    dep = saved["deployment"]
    assert dep["threshold"] == 0.5 and dep["source"] == "validation twin EER"
    assert dep["twin_far"] == pytest.approx(np.mean(scores[kinds == "twin"] >= 0.5), abs=1e-4)
    assert dep["twin_frr"] == pytest.approx(np.mean(scores[kinds == "genuine"] < 0.5), abs=1e-4)

    text = format_summary(metrics)
    assert text.splitlines()[1].startswith("Twin") and f"AUC {metrics['twin']['auc']:.4f}" in text
    assert "Deployment threshold 0.5000" in text


def test_val_split_and_training_path_agree(demo_data, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run", demo_data, threshold=None)
    metrics = evaluate_checkpoint(ckpt, demo_data, split="val", out=tmp_path / "val_eval",
                                  embedding="sa", device="cpu", gallery_n=0)
    assert "deployment" not in metrics and metrics["split"] == "val"

    cfg = make_config(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    _, val = split_val(load_split(demo_data, "train"), 2, cfg.seed)
    state = torch.load(ckpt, weights_only=False)
    model = build_model(cfg, state["num_classes"])
    model.load_state_dict(state["model"])
    model.train()
    transform = build_transform(data_config(model), 32, train=False)
    direct = evaluate_split(model, val, transform, "cpu", kind="sa")
    assert model.training  # validation during training must not leave the model in eval mode
    for kind in ("twin", "general", "all"):
        assert direct[kind] == pytest.approx(metrics[kind], abs=1e-5)
