"""DCAL around a timm VisionTransformer: self-attention (SA), attention rollout, global-local
cross-attention (GLCA) and pair-wise cross-attention (PWCA).

The backbone's own modules are used; only the attention arithmetic is spelt out, so that PWCA can
attend to a partner's keys/values and GLCA can query a subset of tokens. Attention outputs come
from `scaled_dot_product_attention` (no N×N tensor kept for backward); the head-averaged
probabilities that the rollout needs are recomputed without autograd.
"""

from __future__ import annotations

import copy
import math

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError
from .losses import IdentityHead, batch_hard_triplet, uncertainty_weighted


def create_backbone(cfg, meta: bool = False) -> VisionTransformer:
    """The timm ViT named by `cfg.backbone`, checked for what DCAL needs.

    `meta=True` builds it without memory or weights, to validate a config before any work.
    """
    kwargs = dict(num_classes=0, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if cfg.depth:
        kwargs["depth"] = cfg.depth
    if not meta and (cfg.pretrained or cfg.pretrained_path):
        if cfg.depth:
            raise ConfigError(f"depth={cfg.depth} truncates the backbone: use it with pretrained=False only")
        kwargs["pretrained"] = True
        if cfg.pretrained_path:
            kwargs["pretrained_cfg_overlay"] = {"file": cfg.pretrained_path}
    try:
        if meta:
            with torch.device("meta"):
                backbone = timm.create_model(cfg.backbone, **kwargs)
        else:
            backbone = timm.create_model(cfg.backbone, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"backbone={cfg.backbone!r} is not a timm VisionTransformer DCAL can build ({e}); "
                         "use a timm ViT/DeiT name, e.g. from timm.list_models('vit_*')") from e
    if not isinstance(backbone, VisionTransformer) or backbone.cls_token is None:
        raise ConfigError(f"backbone={cfg.backbone!r} is not a timm VisionTransformer with a class token")
    bad = [type(b).__name__ for b in backbone.blocks if type(b) is not Block or type(b.attn) is not Attention]
    if bad or any(getattr(b.attn, "gate", None) is not None for b in backbone.blocks):
        raise ConfigError(f"backbone={cfg.backbone!r} has blocks DCAL cannot rewire: {bad[:1] or 'gated attention'}")
    patch = backbone.patch_embed.patch_size
    if cfg.img_size % patch[0] or cfg.img_size % patch[1]:
        raise ConfigError(f"img_size={cfg.img_size} is not divisible by the patch size {patch[0]} of {cfg.backbone}")
    return backbone


def _qkv(attn: Attention, h: torch.Tensor):
    B, N, _ = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _project(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    B, H, n, d = o.shape
    return attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, n, H * d))))


def _sdpa(attn: Attention, q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)


def pair_attention(attn: Attention, q, k, v, k_partner, v_partner) -> torch.Tensor:
    """PWCA: queries attend to [own keys ; partner's keys] under one softmax."""
    return _sdpa(attn, q, torch.cat([k, k_partner], dim=2), torch.cat([v, v_partner], dim=2))


@torch.no_grad()
def head_mean_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities averaged over heads, (B, Nq, N), in float32."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32).mean(1)


@torch.no_grad()
def attention_rollout(attn: list[torch.Tensor]) -> torch.Tensor:
    """CLS row of Ā_i·…·Ā_1 with Ā = 0.5·A + 0.5·I, for head-averaged A in forward order.

    Multiplying a row vector from the newest block down costs O(i·N²) instead of O(i·N³).
    """
    r = torch.zeros_like(attn[0][:, 0])
    r[:, 0] = 1.0
    for a in reversed(attn):
        r = 0.5 * torch.bmm(r.unsqueeze(1), a).squeeze(1) + 0.5 * r
    return r


def _block(blk: Block, x, p=None, partner=None, want_attn: bool = False):
    """One pre-LN block on the SA tokens `x` and, when given, the PWCA stream `p`.

    Both streams go through the same linear layers in one batch; the PWCA stream's attention
    reuses the partner's SA keys/values computed here.
    """
    B, attn = x.shape[0], blk.attn
    xs = x if p is None else torch.cat([x, p])
    q, k, v = _qkv(attn, blk.norm1(xs))
    a = None
    if want_attn and not torch.is_grad_enabled():
        # Inference: the probabilities are formed anyway, so the rollout reuses them (nothing is kept
        # for backward). Training uses the fused kernel and recomputes them below without autograd.
        probs = ((q[:B] * attn.scale) @ k[:B].transpose(-2, -1)).softmax(-1, dtype=torch.float32)
        o, a = probs.to(v.dtype) @ v[:B], probs.mean(1)
    else:
        o = _sdpa(attn, q[:B], k[:B], v[:B])
    if p is not None:
        op = pair_attention(attn, q[B:], k[B:], v[B:], k[:B][partner], v[:B][partner])
        o = torch.cat([o, op])
    xs = xs + blk.drop_path1(blk.ls1(_project(attn, o)))
    xs = xs + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xs))))
    if want_attn and a is None:
        a = head_mean_attention(q[:B], k[:B], attn.scale)
    return (xs, None, a) if p is None else (xs[:B], xs[B:], a)


def choose_partners(labels: torch.Tensor, groups: torch.Tensor, mode: str) -> torch.Tensor:
    """A partner index for each image of the batch this replica sees, never itself if avoidable.

    `twin` picks an image of a sibling identity when the batch holds one, else any other image.
    """
    n = len(labels)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=labels.device)
    cand = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if mode == "twin":
        twin = (groups[:, None] == groups[None, :]) & (labels[:, None] != labels[None, :])
        cand = torch.where(twin.any(1, keepdim=True), twin, cand)
    return torch.multinomial(cand.float(), 1).squeeze(1)


class DCAL(nn.Module):
    def __init__(self, backbone: VisionTransformer, num_classes: int, use_glca: bool = True,
                 use_pwca: bool = True, glca_ratio: float = 0.1, glca_readout: str = "mean",
                 pwca_partner: str = "random", id_loss: str = "cosface", grad_ckpt: bool = False,
                 triplet_margin: float = 0.3):
        super().__init__()
        self.backbone = backbone
        self.use_glca, self.use_pwca = use_glca, use_pwca
        self.glca_readout, self.pwca_partner = glca_readout, pwca_partner
        self.grad_ckpt, self.triplet_margin = grad_ckpt, triplet_margin
        self.num_prefix = backbone.num_prefix_tokens
        self.grid = backbone.patch_embed.grid_size
        self.glca_k = math.ceil(glca_ratio * self.grid[0] * self.grid[1])
        dim = backbone.embed_dim
        self.sa_head = IdentityHead(dim, num_classes, id_loss)
        if use_glca:
            # A copy, not a tie: GLCA starts from the pretrained last block and then learns apart.
            self.glca_block = copy.deepcopy(backbone.blocks[-1])
            self.glca_norm = copy.deepcopy(backbone.norm)
            self.glca_head = IdentityHead(dim, num_classes, id_loss)
        self.branches = ["sa"] + ["glca"] * use_glca + ["pwca"] * use_pwca
        self.loss_log_vars = nn.Parameter(torch.zeros(len(self.branches)))

    def _tokens(self, images, partner=None, attn_blocks: int = 0):
        """Run the blocks; return (tokens entering the last block, SA out, PWCA out, attention)."""
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        p = x if partner is not None else None
        attn, last_in = [], None
        for i, blk in enumerate(bb.blocks):
            if i == len(bb.blocks) - 1:
                last_in = x
            args = (blk, x, p, partner, i < attn_blocks)
            if self.grad_ckpt and self.training:
                x, p, a = checkpoint(_block, *args, use_reentrant=False)
            else:
                x, p, a = _block(*args)
            if a is not None:
                attn.append(a)
        return last_in, x, p, attn

    def _glca(self, x: torch.Tensor, rollout: torch.Tensor, want_attn: bool = False):
        """The GLCA block on CLS + the top-k patches by rollout; keys/values are all tokens."""
        blk, attn = self.glca_block, self.glca_block.attn
        idx = rollout[:, self.num_prefix:].topk(self.glca_k, dim=1).indices + self.num_prefix
        sel = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)
        xs = x.gather(1, sel[..., None].expand(-1, -1, x.shape[-1]))
        h, hs = blk.norm1(x), blk.norm1(xs)
        dim = attn.num_heads * attn.head_dim
        w, b = attn.qkv.weight, attn.qkv.bias
        B, N, n = x.shape[0], x.shape[1], xs.shape[1]
        q = F.linear(hs, w[:dim], None if b is None else b[:dim])
        kv = F.linear(h, w[dim:], None if b is None else b[dim:])
        q = attn.q_norm(q.reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2))
        k, v = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = attn.k_norm(k)
        xs = xs + blk.drop_path1(blk.ls1(_project(attn, _sdpa(attn, q, k, v))))
        xs = self.glca_norm(xs + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xs)))))
        feat = xs[:, 0] if self.glca_readout == "cls" else xs[:, 1:].mean(1)
        if not want_attn:
            return feat, idx, None
        a = head_mean_attention(q, k, attn.scale)
        a = a[:, 0] if self.glca_readout == "cls" else a[:, 1:].mean(1)
        return feat, idx, a

    def forward(self, images, labels, sibling_ids):
        """Training step: total loss and its parts, each shaped (1,) so DataParallel gathers scalars."""
        partner = choose_partners(labels, sibling_ids, self.pwca_partner) if self.use_pwca else None
        depth = len(self.backbone.blocks)
        last_in, x, p, attn = self._tokens(images, partner, depth - 1 if self.use_glca else 0)
        feats = {"sa": self.backbone.norm(x)[:, 0]}
        if self.use_glca:
            feats["glca"] = self._glca(last_in, attention_rollout(attn))[0]
        if self.use_pwca:
            feats["pwca"] = self.backbone.norm(p)[:, 0]  # same target and head as SA: the partner is a distractor
        out = {}
        for b, f in feats.items():
            out[f"id_{b}"] = (self.glca_head if b == "glca" else self.sa_head)(f, labels)
            out[f"tri_{b}"] = batch_hard_triplet(f, labels, self.triplet_margin)
        branch = torch.stack([out[f"id_{b}"] + out[f"tri_{b}"] for b in self.branches])
        out["loss"] = uncertainty_weighted(branch, self.loss_log_vars)
        out.update({f"w_{b}": w for b, w in zip(self.branches, self.loss_log_vars, strict=True)})
        return {k: v.reshape(1) for k, v in out.items()}

    def encode(self, images) -> dict[str, torch.Tensor]:
        """Final-norm features of the inference branches (PWCA is training-only)."""
        depth = len(self.backbone.blocks)
        last_in, x, _, attn = self._tokens(images, attn_blocks=depth - 1 if self.use_glca else 0)
        feats = {"sa": self.backbone.norm(x)[:, 0]}
        if self.use_glca:
            feats["glca"] = self._glca(last_in, attention_rollout(attn))[0]
        return feats

    def embed(self, images, kind: str = "sa+glca") -> torch.Tensor:
        return combine_features(self.encode(images), kind)

    @torch.no_grad()
    def explain(self, images) -> dict:
        """What the maps show: rollout over all blocks, GLCA selection and attention, patch tokens, and
        the branch features of `encode` (so a pair view needs one forward pass)."""
        depth = len(self.backbone.blocks)
        last_in, x, _, attn = self._tokens(images, attn_blocks=depth)
        npf = self.num_prefix
        x = self.backbone.norm(x)
        out = {"rollout": attention_rollout(attn)[:, npf:], "grid": tuple(self.grid),
               "patch_tokens": x[:, npf:], "features": {"sa": x[:, 0]}}
        if self.use_glca:
            feat, idx, a = self._glca(last_in, attention_rollout(attn[:-1]), want_attn=True)
            out["glca_idx"], out["glca_attn"], out["features"]["glca"] = idx - npf, a[:, npf:], feat
        return out


def combine_features(feats: dict[str, torch.Tensor], kind: str = "sa+glca") -> torch.Tensor:
    """L2-normalised concatenation of the normalised branch features named in `kind`.

    A model trained without GLCA embeds with SA alone, so baselines evaluate unchanged.
    """
    parts = [F.normalize(feats[b].float(), dim=1) for b in kind.split("+") if b in feats]
    if not parts:
        raise ConfigError(f"embedding {kind!r}: this model has only {'+'.join(feats)}")
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def build_model(cfg, num_classes: int) -> DCAL:
    return DCAL(create_backbone(cfg), num_classes, use_glca=cfg.use_glca, use_pwca=cfg.use_pwca,
                glca_ratio=cfg.glca_ratio, glca_readout=cfg.glca_readout, pwca_partner=cfg.pwca_partner,
                id_loss=cfg.id_loss, grad_ckpt=cfg.grad_ckpt)


def data_config(model: DCAL) -> dict:
    """Mean, std and interpolation of the backbone's pretraining (timm's data config)."""
    return timm.data.resolve_data_config(model=model.backbone)
