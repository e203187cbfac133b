import math

import pytest
import torch
import torch.nn.functional as F

import dcal_lib.model as model_mod
from dcal_lib.config import make_config
from dcal_lib.model import attention_rollout, build_model, choose_partners


def tiny(backbone="vit_tiny_patch16_224", img_size=64, depth=3, num_classes=6, **kw):
    torch.manual_seed(0)
    cfg = make_config(backbone=backbone, pretrained=False, img_size=img_size, depth=depth, **kw)
    return build_model(cfg, num_classes)


def timm_attention_probs(backbone, x):
    """Per-block attention probabilities from timm's own non-fused path, captured by hooks."""
    probs, hooks = [], []
    for blk in backbone.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(i[0].mean(1))))
    with torch.no_grad():
        backbone.forward_features(x)
    for h in hooks:
        h.remove()
    return probs


def full_rollout_row(probs):
    n = probs[0].shape[-1]
    eye = torch.eye(n)
    s = torch.stack([eye] * probs[0].shape[0])
    for a in probs:  # newest block multiplies from the left
        s = (0.5 * a + 0.5 * eye) @ s
    return s[:, 0]


@pytest.mark.parametrize("backbone,img_size", [
    ("vit_tiny_patch16_224", 64),
    ("deit_tiny_distilled_patch16_224", 64),  # CLS + distillation token
    ("vit_small_patch14_reg4_dinov2", 56),  # CLS + 4 registers, LayerScale
])
def test_sa_feature_equals_timm_forward_features(backbone, img_size):
    m = tiny(backbone, img_size, depth=2, use_glca=False, use_pwca=False).eval()
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        ref = m.backbone.forward_features(x)[:, 0]
        assert torch.allclose(m.encode(x)["sa"], ref, atol=1e-5)


@pytest.mark.parametrize("backbone,img_size", [("vit_tiny_patch16_224", 64), ("vit_small_patch14_reg4_dinov2", 56)])
def test_rollout_and_glca_selection_match_explicit_matrix_product(backbone, img_size):
    m = tiny(backbone, img_size, depth=3).eval()
    x = torch.randn(2, 3, img_size, img_size)
    out = m.explain(x)
    probs = timm_attention_probs(m.backbone, x)
    npf = m.num_prefix
    assert torch.allclose(out["rollout"], full_rollout_row(probs)[:, npf:], atol=1e-5)
    # GLCA sits beside the last block: its selection uses the rollout of the blocks before it.
    partial = full_rollout_row(probs[:-1])[:, npf:]
    k = math.ceil(0.1 * partial.shape[1])
    assert out["glca_idx"].shape == (2, k)
    assert torch.equal(out["glca_idx"].sort(1).values, partial.topk(k, 1).indices.sort(1).values)


def test_rollout_row_is_a_distribution_and_needs_no_full_product():
    a = torch.softmax(torch.randn(3, 5, 9, 9), -1)
    r = attention_rollout(list(a.unbind(1)))
    assert torch.allclose(r.sum(1), torch.ones(3), atol=1e-6)
    assert torch.allclose(r, full_rollout_row(list(a.unbind(1))), atol=1e-6)


def test_glca_cls_readout_equals_sa_at_init_and_ignores_selection():
    m = tiny(glca_readout="cls").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.encode(x)
        assert torch.allclose(feats["glca"], feats["sa"], atol=1e-5)
        last_in, _, _, attn = m._tokens(x, attn_blocks=2)
        r = attention_rollout(attn)
        assert torch.allclose(m._glca(last_in, r)[0], m._glca(last_in, -r)[0], atol=1e-5)


def test_glca_mean_readout_changes_with_the_selection():
    m = tiny(glca_readout="mean").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last_in, _, _, attn = m._tokens(x, attn_blocks=2)
        r = attention_rollout(attn)
        top, idx_top, _ = m._glca(last_in, r)
        bottom, idx_bottom, _ = m._glca(last_in, -r)
    assert not set(idx_top[0].tolist()) & set(idx_bottom[0].tolist())
    assert (top - bottom).abs().max() > 1e-3


def test_pwca_with_partner_masked_out_equals_sa(monkeypatch):
    m = tiny(use_glca=False).eval()
    x = torch.randn(4, 3, 64, 64)

    def own_keys_only(attn, q, k, v, kp, vp):
        keys, vals = torch.cat([k, kp], 2), torch.cat([v, vp], 2)
        mask = torch.zeros(1, keys.shape[2], dtype=torch.bool)
        mask[:, : k.shape[2]] = True
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)

    monkeypatch.setattr(model_mod, "pair_attention", own_keys_only)
    with torch.no_grad():
        _, sa, pw, _ = m._tokens(x, partner=torch.tensor([1, 2, 3, 0]))
    assert torch.allclose(sa, pw, atol=1e-5)


def test_pwca_partner_tokens_change_the_stream_and_carry_gradient():
    m = tiny(use_glca=False).eval()
    x = torch.randn(4, 3, 64, 64, requires_grad=True)
    _, sa, pw, _ = m._tokens(x, partner=torch.tensor([1, 2, 3, 0]))
    assert (sa - pw).abs().max() > 1e-3
    pw[0].sum().backward()  # image 0's PWCA stream depends on its partner, image 1
    assert x.grad[1].abs().sum() > 0 and x.grad[2].abs().sum() == 0


def test_pwca_with_itself_as_partner_is_sa():
    """Duplicated keys/values leave softmax-weighted sums unchanged: a check of the concatenation."""
    m = tiny(use_glca=False).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, sa, pw, _ = m._tokens(x, partner=torch.arange(3))
    assert torch.allclose(sa, pw, atol=1e-5)


def test_partners_twin_and_random():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # id 4 has no sibling in the batch
    for _ in range(50):
        for mode in ("random", "twin"):
            p = choose_partners(labels, groups, mode)
            assert (p != torch.arange(10)).all()
        p = choose_partners(labels, groups, "twin")
        twin = (groups[p] == groups) & (labels[p] != labels)
        assert twin[:8].all()
    assert choose_partners(torch.tensor([3]), torch.tensor([0]), "twin").tolist() == [0]


def test_every_parameter_gets_a_gradient_and_a_tiny_batch_is_learnt():
    m = tiny(drop_path=0.0).train()
    x = torch.randn(8, 3, 64, 64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = m(x, labels, groups)
    out["loss"].sum().backward()
    assert all(v.shape == (1,) for v in out.values())
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = last = None
    for _ in range(25):
        opt.zero_grad()
        out = m(x, labels, groups)
        out["loss"].sum().backward()
        opt.step()
        ids = sum(out[f"id_{b}"].item() for b in m.branches)
        first = ids if first is None else first
        last = ids
    assert last < 0.3 * first


def test_bf16_autocast_on_cpu():
    m = tiny().train()
    x = torch.randn(4, 3, 64, 64)
    labels, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, labels, groups)
    out["loss"].sum().backward()
    assert torch.isfinite(out["loss"]).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(4, 3, 64, 64)
    labels, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0])
    grads = []
    for ckpt in (False, True):
        m = tiny(drop_path=0.0, grad_ckpt=ckpt).train()
        torch.manual_seed(1)  # same partners
        m(x, labels, groups)["loss"].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_embed_is_normalised_and_bad_configs_fail_early():
    m = tiny().eval()
    with torch.no_grad():
        e = m.embed(torch.randn(2, 3, 64, 64))
    assert e.shape == (2, 2 * 192) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny(img_size=60)
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        tiny("resnet18")


def test_inference_path_reusing_probabilities_matches_the_training_path():
    m = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = m.encode(x)
    slow = m.encode(x)  # grad enabled: fused attention, probabilities recomputed for the rollout
    for b in ("sa", "glca"):
        assert torch.allclose(fast[b], slow[b].detach(), atol=1e-5)


def test_explain_features_are_the_encode_features():
    m = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, ex = m.encode(x), m.explain(x)
    assert all(torch.allclose(ex["features"][b], feats[b], atol=1e-5) for b in ("sa", "glca"))
