"""DCAL against the plain timm ViT it is built on: step and inference time ratios, peak memory, FLOPs,
the attention-rollout share and the data pipeline's images/s, measured in one run.

    python -m dcal_lib bench --img-size 448 --batch 2 --out bench.json

Both models are trained the same way (CLS feature, cosface + batch-hard triplet, AdamW, the trainer's
AMP); timings are interleaved step by step so that a change of machine load hits all models alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .config import make_config
from .data import FaceDataset, build_transform, load_split
from .losses import IdentityHead, batch_hard_triplet
from .model import _qkv, attention_rollout, build_model, create_backbone, data_config, head_mean_attention
from .synthetic import make_demo_data
from .train import amp_dtype, seed_everything

MEM_STEPS = 2  # the peak needs optimizer state, the last gradients and activations alive at once: step 2
PEAK_TFLOPS = {"T4": 65, "2080 Ti": 107, "V100": 125, "A100": 312, "H100": 990, "H200": 990}  # dense fp16
VARIANTS = {"plain": (False, False), "dcal": (True, True), "glca": (True, False), "pwca": (False, True)}
_aten = torch.ops.aten
# FlopCounterMode has no formula for the CPU attention kernel: without these, CPU counts miss attention.
CPU_SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
}


class PlainViT(nn.Module):
    """The baseline: the timm ViT's CLS feature with the same identity head and triplet loss as DCAL."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, IdentityHead(backbone.embed_dim, num_classes)

    def forward(self, images, labels, sibling_ids):
        feat = self.backbone.forward_features(images)[:, 0]
        return {"loss": (self.head(feat, labels) + batch_hard_triplet(feat, labels)).reshape(1)}

    def embed(self, images):
        return self.backbone.forward_features(images)[:, 0]


def _setup(variant: str, spec: dict):
    """(model, images, AMP dtype, a closure doing one training step as the trainer does it)."""
    device, b = torch.device(spec["device"]), spec["batch"]
    seed_everything(0)
    glca, pwca = VARIANTS[variant]
    cfg = make_config(**{k: spec[k] for k in ("backbone", "img_size", "depth", "amp", "grad_ckpt")},
                      pretrained=False, use_glca=glca, use_pwca=pwca)
    model = PlainViT(create_backbone(cfg), b) if variant == "plain" else build_model(cfg, num_classes=b)
    model.to(device)
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.arange(b, device=device) // 2  # 2 images per id, ids in twin pairs
    dtype = amp_dtype(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(images, labels, labels // 2)["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return model, images, dtype, step


def _rss() -> int:
    """Resident set size now, in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(variant: str, spec: dict) -> tuple[int, float]:
    """In a fresh process: (peak training memory in bytes, forward + backward FLOPs per image).
    Memory: CPU = RSS growth over the steps, CUDA = max allocated (weights included)."""
    _, images, _, step = _setup(variant, spec)
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = 0 if cuda else _rss()
    for _ in range(MEM_STEPS):
        step()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)  # KiB on Linux
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:  # after: it holds memory
        step()
    return peak, counter.get_total_flops() / len(images)  # the optimizer's elementwise updates count 0


def _in_fresh_processes(variants: list[str], spec: dict) -> dict[str, tuple[int, float]]:
    """Each model in its own process, one after the other, so that no peak hides or crowds another.
    The processes fork from a server that imports this module once (scripts: use a __main__ guard)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    out = {}
    for v in variants:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            out[v] = pool.submit(_child, v, spec).result()
    return out


def _medians(fns: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, called in turn within every round. CUDA: wall time;
    CPU: this process's CPU time (all threads), which other work on a shared machine does not inflate."""
    cuda = device.type == "cuda"
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else (lambda: None, time.process_time)
    times = {k: [] for k in fns}
    for i in range(warmup + steps):
        for k, fn in fns.items():
            sync()
            t = clock()
            fn()
            sync()
            if i >= warmup:
                times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def _rollout_fn(model, images, dtype):
    """The rollout work alone on the model's real q, k: head-averaged attention of the first L-1 blocks
    (recomputed without autograd, as in training) and the CLS-row product."""
    bb = model.backbone
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        x = bb.norm_pre(bb._pos_embed(bb.patch_embed(images)))
        qk = []
        for blk in bb.blocks[:-1]:
            q, k, _ = _qkv(blk.attn, blk.norm1(x))
            qk.append((q, k, blk.attn.scale))
            x = blk(x)
    return lambda: attention_rollout([head_mean_attention(q, k, s) for q, k, s in qk])


def _data_rate(img_size: int, dcfg: dict) -> float:
    """Decoded + augmented images per CPU second of one loader worker (one thread), img_size-px JPEGs."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(tmp, ids=15, size=img_size, seed=0)
        ds = FaceDataset(load_split(tmp, "train").samples(), build_transform(dcfg, img_size, train=True))
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            ds[0, 0]
            t = time.process_time()
            for i in range(len(ds)):
                ds[i, i]
            return len(ds) / (time.process_time() - t)
        finally:
            torch.set_num_threads(threads)


def run_bench(backbone="vit_small_patch16_224", img_size=224, batch=8, steps=5, warmup=2, depth=0,
              device=None, amp=None, workers=1, grad_ckpt=False) -> dict:
    """Measure DCAL against the plain ViT; returns the table as a flat dict (see `format_table`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp  # the trainer's choice on GPUs; fp32 CPU baseline
    spec = dict(backbone=backbone, img_size=img_size, batch=batch, depth=depth, device=str(device), amp=amp,
                grad_ckpt=grad_ckpt)
    mem, flops = ({v: m[i] for v, m in _in_fresh_processes(["plain", "dcal"], spec).items()} for i in (0, 1))
    setups = {v: _setup(v, spec) for v in VARIANTS}
    train = _medians({v: s[-1] for v, s in setups.items()}, steps, warmup, device)
    (plain, x, dtype, _), dcal = setups.pop("plain"), setups.pop("dcal")[0]
    del setups
    plain.eval()
    dcal.eval()
    fns = {"plain": lambda: plain.embed(x), "dcal": lambda: dcal.embed(x), "r": _rollout_fn(dcal, x, dtype)}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        embed = _medians(fns, 3 * steps, warmup, device)  # a third of a step each; the 1.10 target is tight
    rollout, per_worker = embed.pop("r"), _data_rate(img_size, data_config(dcal))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    t = dict(backbone=backbone, img_size=img_size, batch=batch, steps=steps, warmup=warmup, depth=depth,
             device=name, dtype=str(dtype or torch.float32).removeprefix("torch."), grad_ckpt=grad_ckpt,
             threads=torch.get_num_threads(), load_avg=round(os.getloadavg()[0], 2), cpu_count=os.cpu_count(),
             workers=workers, mem_kind="cuda max allocated" if device.type == "cuda" else "RSS growth",
             clock="wall" if device.type == "cuda" else "process CPU time")
    for v in VARIANTS:
        t[f"train_s_{v}"], t[f"train_ratio_{v}"] = train[v], train[v] / train["plain"]
    for v in ("plain", "dcal"):
        t[f"embed_s_{v}"], t[f"mem_mib_{v}"], t[f"gflops_{v}"] = embed[v], mem[v] / 2**20, flops[v] / 1e9
        t[f"images_s_{v}"] = batch / train[v]
        t[f"gpu_peak_frac_{v}"] = peak and flops[v] * batch / train[v] / (peak * 1e12)
    t |= dict(embed_ratio=embed["dcal"] / embed["plain"], mem_ratio=mem["dcal"] / mem["plain"],
              flops_ratio=flops["dcal"] / flops["plain"], peak_tflops=peak, rollout_s=rollout,
              rollout_pct_train=100 * rollout / train["dcal"],
              data_images_s_per_worker=per_worker, data_images_s=per_worker * workers,
              images_s_needed=batch / train["dcal"])
    t["data_keeps_up"] = t["data_images_s"] >= t["images_s_needed"]
    return t


def format_table(t: dict) -> str:
    def row(label, plain="", dcal="", ratio="", fmt=".3f"):
        cells = [f"{v:{f}}" if isinstance(v, float) else v
                 for v, f in ((plain, fmt), (dcal, fmt), (ratio, ".2f"))]
        return f"{label:<40}{cells[0]:>10}{cells[1]:>10}{cells[2]:>8}"

    peak = t["peak_tflops"]
    frac = [f"{100 * t[f'gpu_peak_frac_{v}']:.1f} %" if peak else "n/a" for v in ("plain", "dcal")]
    return "\n".join([
        f"DCAL vs plain ViT: {t['backbone']} {t['img_size']} px, batch {t['batch']}, {t['device']} "
        f"{t['dtype']}{', grad_ckpt' if t['grad_ckpt'] else ''}; median of {t['steps']} steps "
        f"({3 * t['steps']} embeds) after {t['warmup']} warm-up; {t['clock']}, {t['threads']} threads, "
        f"load avg {t['load_avg']} on {t['cpu_count']} CPUs",
        row("", "plain", "DCAL", "ratio"),
        row("train step (s)", t["train_s_plain"], t["train_s_dcal"], t["train_ratio_dcal"]),
        row("  DCAL with GLCA only (s)", "", t["train_s_glca"], t["train_ratio_glca"]),
        row("  DCAL with PWCA only (s)", "", t["train_s_pwca"], t["train_ratio_pwca"]),
        row("embed (s)", t["embed_s_plain"], t["embed_s_dcal"], t["embed_ratio"]),
        row(f"peak train memory (MiB, {t['mem_kind']})", t["mem_mib_plain"], t["mem_mib_dcal"],
            t["mem_ratio"], ".0f"),
        row("train GFLOPs / image", t["gflops_plain"], t["gflops_dcal"], t["flops_ratio"], ".2f"),
        row("train images/s", t["images_s_plain"], t["images_s_dcal"], fmt=".2f"),
        row(f"GPU peak fraction{f' (of {peak} TFLOP/s)' if peak else ''}", *frac),
        f"rollout alone, as in training (head-mean attention recomputed for L-1 blocks + CLS-row product): "
        f"{1e3 * t['rollout_s']:.1f} ms = {t['rollout_pct_train']:.2f} % of the DCAL train step",
        f"data: {t['data_images_s_per_worker']:.1f} images/s per worker ({t['img_size']} px JPEG, decode + "
        f"augment); x{t['workers']} workers = {t['data_images_s']:.1f}; images/s needed = batch / DCAL step "
        f"time = {t['images_s_needed']:.1f} -> {'keeps up' if t['data_keeps_up'] else 'TOO SLOW'}",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcal_lib bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--depth", type=int, default=0, help="0 = the backbone's own depth")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 on CPU too (GPUs: always)")
    p.add_argument("--workers", type=int, default=1, help="loader workers the data rate is scaled to")
    p.add_argument("--grad-ckpt", action="store_true", help="DCAL with gradient checkpointing")
    p.add_argument("--out", default="bench.json")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table = run_bench(a.backbone, a.img_size, a.batch, a.steps, a.warmup, a.depth, a.device, a.amp, a.workers,
                      a.grad_ckpt)
    print(format_table(table))
    Path(a.out).write_text(json.dumps(table, indent=1))
    print(f"wrote {a.out}")
    return 0
