from pathlib import Path

import numpy as np
import pytest
import torch

from dcal_lib import explain
from dcal_lib.checkpoint import load_checkpoint, save_checkpoint
from dcal_lib.config import make_config
from dcal_lib.data import DataError, build_transform, load_split
from dcal_lib.model import build_model, data_config
from dcal_lib.pairs import make_pairs


def tiny_model(img_size=32, depth=2):
    torch.manual_seed(0)
    return build_model(make_config(backbone="vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                                   depth=depth), num_classes=4).eval()


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """A checkpoint from one real training epoch (with a validation threshold) and its test split."""
    from dcal_lib.train import train

    run = tmp_path_factory.mktemp("run")
    result = train(make_config(data_dir=str(demo_data), output_dir=str(run), backbone="vit_tiny_patch16_224",
                               pretrained=False, img_size=32, depth=2, epochs=1, batch_size=16,
                               images_per_id=2, val_groups=2, num_workers=0, amp=False))
    return Path(result["checkpoint"]), load_split(demo_data, "test")


def test_rollout_map_of_uniform_attention_matches_hand_computation():
    # zero q/k/v weights: every attention row is uniform, A = 1/N, and with Ā = (A + I)/2 the CLS
    # rollout after L blocks is r = 0.5^L e0 + (1 - 0.5^L)/N (row sums stay 1).
    model = tiny_model(depth=3)
    for blk in model.backbone.blocks:
        blk.attn.qkv.weight.data.zero_()
        blk.attn.qkv.bias.data.zero_()
    L, N = 3, 1 + 2 * 2
    ex = model.explain(images())
    expected = torch.full((2, N - 1), (1 - 0.5 ** L) / N)
    torch.testing.assert_close(ex["rollout"], expected)
    maps = explain.image_maps(model, images())
    np.testing.assert_allclose(maps["rollout"], np.ones((2, 2, 2)), rtol=1e-6)


def test_rollout_map_of_self_attention_is_zero_without_nan():
    # Hand-built tokens: patch projection, MLP and attention output zeroed so every token is its position
    # embedding in every block; each token's position embedding is +-1 on its own 2 dims of every head
    # (LayerNorm makes those +-sqrt(32)), and q = k = 5 * LayerNorm(x). Per head q_i.k_j = 0 for i != j and
    # scale * q_i.k_i = 2 * 25 * 32 / 8 = 200, so softmax gives A = I exactly in float32 (exp(-200) = 0):
    # the rollout row stays e0 and none of it falls on the patches.
    model = tiny_model()
    bb, D, N = model.backbone, model.backbone.embed_dim, 5
    bb.patch_embed.proj.weight.data.zero_()
    bb.patch_embed.proj.bias.data.zero_()
    bb.cls_token.data.zero_()
    pos = torch.zeros(N, D)
    heads, hd = bb.blocks[0].attn.num_heads, bb.blocks[0].attn.head_dim
    for i in range(N):
        for h in range(heads):
            pos[i, h * hd + 2 * i], pos[i, h * hd + 2 * i + 1] = 1.0, -1.0
    bb.pos_embed.data.copy_(pos[None])
    for blk in bb.blocks:
        blk.attn.qkv.weight.data.zero_()
        blk.attn.qkv.weight.data[:2 * D] = 5 * torch.eye(D).repeat(2, 1)
        blk.attn.qkv.bias.data.zero_()
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.data.zero_()
            lin.bias.data.zero_()
    ex = model.explain(images())
    assert ex["rollout"].abs().max() < 1e-12
    maps = explain.image_maps(model, images())
    assert np.isfinite(maps["rollout"]).all() and (maps["rollout"] == 0).all()


def test_maps_are_finite_nonnegative_and_normalised():
    model = tiny_model(img_size=64)
    maps = explain.image_maps(model, images(3, 64))
    assert maps["grid"] == (4, 4)
    for name in ("rollout", "glca_attn"):
        m = maps[name]
        assert m.shape == (3, 4, 4) and np.isfinite(m).all() and (m >= 0).all()
        np.testing.assert_allclose(m.reshape(3, -1).max(1), 1.0, rtol=1e-6)
    # GLCA queries: k = ceil(0.1 * 16) = 2 patches, the top-2 of the rollout over the first block
    assert maps["glca_mask"].dtype == bool and (maps["glca_mask"].reshape(3, -1).sum(1) == 2).all()
    assert maps["tokens"].shape == (3, 16, model.backbone.embed_dim)
    up = explain.upsample(maps["rollout"][0], (64, 64))
    assert up.shape == (64, 64) and up.min() >= 0 and up.max() <= 1 + 1e-6


def test_model_without_glca_has_only_the_rollout_map():
    cfg = make_config(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, use_glca=False)
    maps = explain.image_maps(build_model(cfg, 4).eval(), images())
    assert "rollout" in maps and "glca_mask" not in maps


def test_difference_map_is_patchwise_cosine_dissimilarity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    expected = 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(explain.difference_map(a, b, (2, 3)), expected.reshape(2, 3), rtol=1e-5)
    np.testing.assert_allclose(explain.difference_map(a, a, (2, 3)), 0, atol=1e-6)


def test_difference_map_of_real_images(demo_data):
    model = tiny_model(img_size=64)
    split = load_split(demo_data, "test")
    tf = build_transform(data_config(model), 64, train=False)
    a, b = explain.sibling_pair_paths(split, next(i for i, g in enumerate(split.groups) if len(g) > 1))
    from dcal_lib.data import load_image

    tokens = explain.image_maps(model, torch.stack([tf(load_image(p)) for p in (a, a, b)]))["tokens"]
    assert np.abs(explain.difference_map(tokens[0], tokens[1], (4, 4))).max() < 1e-5
    assert (explain.difference_map(tokens[0], tokens[2], (4, 4)) > 0).all()


def test_sibling_pair_paths(demo_data):
    split = load_split(demo_data, "test")
    g = next(i for i, members in enumerate(split.groups) if len(members) > 1)
    a, b = explain.sibling_pair_paths(split, g)
    first, second = split.groups[g][:2]
    assert (a, b) == (split.images[first][0], split.images[second][0])
    single = [i for i, members in enumerate(split.groups) if len(members) == 1]
    for bad in single[:1] + [len(split.groups)]:
        with pytest.raises(ValueError, match=f"sibling group {bad} "):
            explain.sibling_pair_paths(split, bad)


def test_pair_view_and_gallery_write_figures(trained, tmp_path):
    ckpt, split = trained
    model, tf, state = explain.load_model(ckpt, "cpu")
    a, b = explain.sibling_pair_paths(split, next(i for i, g in enumerate(split.groups) if len(g) > 1))
    fig = explain.pair_view_from_checkpoint(ckpt, a, b, out=tmp_path / "pair.png")
    assert len(fig.axes) >= 8 and "cosine score" in fig._suptitle.get_text()
    assert (tmp_path / "pair.png").stat().st_size > 20_000

    pairs = make_pairs(split)
    scores = np.random.default_rng(0).uniform(-1, 1, len(pairs))
    written = explain.gallery(model, tf, split, pairs, scores, state["threshold"], tmp_path / "gallery", n=2)
    twin = sorted((s for p, s in zip(pairs, scores, strict=True) if p.kind == "twin"), reverse=True)[:2]
    genuine = sorted(s for p, s in zip(pairs, scores, strict=True) if p.kind == "genuine")[:2]
    assert [p.name for p in written] == [f"twin_impostor_{r:02d}_score{s:+.3f}.png" for r, s in enumerate(twin, 1)] \
        + [f"genuine_{r:02d}_score{s:+.3f}.png" for r, s in enumerate(genuine, 1)]
    assert all(p.stat().st_size > 20_000 for p in written)


def test_verify_same_id_and_twins(trained, tmp_path, capsys):
    ckpt, split = trained
    model, tf, state = explain.load_model(ckpt, "cpu")
    assert state["threshold"] is not None
    same_id = next(i for i in split.ids if len(split.images[i]) > 1)
    g = next(i for i, members in enumerate(split.groups) if len(members) > 1)
    from dcal_lib.data import load_image

    for k, (a, b) in enumerate([split.images[same_id][:2], explain.sibling_pair_paths(split, g)]):
        out = tmp_path / f"v{k}.png"
        r = explain.verify(ckpt, a, b, out=out)
        e = model.embed(torch.stack([tf(load_image(p)) for p in (a, b)])).detach()
        assert r["score"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
        assert r["threshold"] == state["threshold"]
        assert r["decision"] == ("same person" if r["score"] >= r["threshold"] else "different people")
        printed = capsys.readouterr().out
        assert f"{r['score']:.4f}" in printed and r["decision"] in printed and "twin EER" in printed
        assert out.stat().st_size > 20_000


def test_verify_errors(trained, tmp_path, capsys):
    ckpt, split = trained
    good = split.images[split.ids[0]][0]
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not an image at all" * 10)
    with pytest.raises(DataError, match="garbage.jpg"):
        explain.verify(ckpt, good, bad, out=tmp_path / "x.png")

    state = load_checkpoint(ckpt)
    state["threshold"] = None
    no_threshold = tmp_path / "run" / "checkpoints" / "nothr.pt"
    save_checkpoint(no_threshold, state)
    r = explain.verify(no_threshold, good, good)
    assert r["decision"] is None and r["score"] == pytest.approx(1.0, abs=1e-5)
    assert "val_groups > 0" in r["message"] and "metrics.json" in r["message"]
    assert r["message"] in capsys.readouterr().out
    assert Path(r["figure"]).parent == tmp_path / "run" / "verify" and Path(r["figure"]).is_file()
