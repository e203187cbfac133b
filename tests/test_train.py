import warnings

import pytest
import torch

import dcal_lib.train as train_mod
from dcal_lib.checkpoint import load_checkpoint
from dcal_lib.config import ConfigError, make_config
from dcal_lib.evaluate import evaluate_checkpoint
from dcal_lib.model import DCAL
from dcal_lib.train import train

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, batch_size=16,
            images_per_id=2, val_groups=2, warmup_epochs=1, amp=False)


def cfg_for(data, out, **kw):
    return make_config(data_dir=str(data), output_dir=str(out), **{**TINY, **kw})


def test_resume_is_bit_identical_with_workers(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path / "straight", epochs=2, num_workers=2))
    train(cfg_for(demo_data, tmp_path / "split", epochs=1, num_workers=2))
    assert load_checkpoint(tmp_path / "split/checkpoints/last.pt")["epoch"] == 1
    train(cfg_for(demo_data, tmp_path / "split", epochs=2, num_workers=2))
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    assert [h["train/loss_epoch"] for h in a["history"]] == [h["train/loss_epoch"] for h in b["history"]]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["threshold"] is not None and b["code_version"]


def test_time_budget_stops_with_a_resumable_checkpoint(demo_data, tmp_path):
    out = train(cfg_for(demo_data, tmp_path, epochs=3, num_workers=0, max_hours=1e-6))
    assert out["stopped_early"] and out["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["epoch"] == 1
    out = train(cfg_for(demo_data, tmp_path, epochs=3, num_workers=0))
    assert not out["stopped_early"] and out["epoch"] == 3


def test_fresh_run_refuses_to_overwrite_and_changed_params_become_tags(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path, epochs=1, num_workers=0))
    with pytest.raises(ConfigError, match="resume='auto'"):
        train(cfg_for(demo_data, tmp_path, epochs=1, num_workers=0, resume=""))
    old = load_checkpoint(tmp_path / "checkpoints/last.pt")["config"]
    new = dict(old, epochs=2, lr=0.1, resume="auto")
    assert train_mod.changed_params(old, new) == {"resume.epochs": "1 -> 2", "resume.lr": "0.0 -> 0.1"}


def test_config_from_checkpoint_keeps_the_run_settings(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path / "run", epochs=1, num_workers=0, glca_readout="cls"))
    cfg = train_mod.config_from_checkpoint(output_dir=str(tmp_path / "run"), epochs=2)
    assert (cfg.glca_readout, cfg.img_size, cfg.epochs) == ("cls", 32, 2)
    assert cfg.resume == str(tmp_path / "run/checkpoints/last.pt")
    assert train(cfg)["epoch"] == 2
    with pytest.raises(ConfigError, match="give checkpoint"):
        train_mod.config_from_checkpoint()


@pytest.mark.parametrize("params,message", [
    (dict(bogus=1), "unknown parameter"),
    (dict(epochs="three"), "expected int"),
    (dict(use_glca="maybe"), "expected bool"),
    (dict(img_size=40), "not divisible by the patch size"),
    (dict(data_dir=""), "data_dir is empty"),
    (dict(data_dir="/nonexistent/folder"), "train_dataset_infor.json"),
    (dict(glca_readout="max"), "expected one of"),
])
def test_bad_parameters_fail_before_any_work(demo_data, tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        train(cfg_for(params.pop("data_dir", demo_data), tmp_path / "run", **params))
    assert not (tmp_path / "run").exists()


def test_persistent_non_finite_loss_stops_the_run(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "MAX_BAD_STEPS", 3)
    real = DCAL.forward

    def nan_loss(self, *args):
        out = real(self, *args)
        return out | {"loss": out["loss"] * float("nan")}

    monkeypatch.setattr(DCAL, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match="not finite for 3 steps"):
        train(cfg_for(demo_data, tmp_path, epochs=1, num_workers=0))


def test_mlflow_server_run_continues_across_resume(demo_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    for epochs in (1, 2):
        train(cfg_for(demo_data, tmp_path, epochs=epochs, num_workers=0, tracker="mlflow", mlflow_uri=mlflow_server,
                      run_name="mlflow-resume"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("dcal-twins")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'mlflow-resume'")
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/twin_eer")]
    assert len(steps) == 2 and steps[0] < steps[1]
    assert runs[0].data.params["backbone"] == "vit_tiny_patch16_224"
    assert runs[0].data.tags["resume.epochs"] == "1 -> 2"
    # the evaluation of the run's checkpoint joins the same run: test metrics and the plots as artifacts
    evaluate_checkpoint(tmp_path / "checkpoints/last.pt", demo_data, gallery_n=0)
    run = client.get_run(runs[0].info.run_id)
    assert "test/twin_auc" in run.data.metrics
    assert {"metrics.json", "roc.png", "scores.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_mlflow_local_store_and_dead_server(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path / "runs/local", epochs=1, num_workers=0, tracker="mlflow"))
    assert (tmp_path / "runs/mlflow.db").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(cfg_for(demo_data, tmp_path / "dead", epochs=1, num_workers=0, tracker="mlflow",
                            mlflow_uri="http://127.0.0.1:9"))
    assert out["epoch"] == 1
    assert sum("tracking disabled" in str(w.message) for w in caught) == 1


def test_wandb_offline_resume_keeps_the_run_id(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path, epochs=1, num_workers=0, tracker="wandb"))
    run_id = load_checkpoint(tmp_path / "checkpoints/last.pt")["tracker_run_id"]
    assert run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    train(cfg_for(demo_data, tmp_path, epochs=2, num_workers=0, tracker="wandb"))
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["tracker_run_id"] == run_id


def test_resume_takes_weights_from_the_checkpoint_not_the_hub(demo_data, tmp_path):
    train(cfg_for(demo_data, tmp_path, epochs=1, num_workers=0))
    # HF_HUB_OFFLINE=1: any attempt to fetch pretrained weights would fail here
    out = train(train_mod.config_from_checkpoint(output_dir=str(tmp_path), epochs=2, pretrained=True))
    assert out["epoch"] == 2
