"""Command line: `python -m dcal_lib <command> …` — thin over the library."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

from .checkpoint import CheckpointError
from .config import FIELDS, ConfigError, make_config
from .data import DataError


def _check_data(args) -> None:
    from .data import load_splits, summarize, verify_images

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(args.data_dir, args.image_root)
    for split in splits:
        print(summarize(split))
        if args.verify_images:
            t = time.monotonic()
            verify_images(split)
            print(f"  all {sum(map(len, split.images.values()))} images decode ({time.monotonic() - t:.1f} s)")
    for w in caught:
        print(f"warning: {w.message}")


def _make_demo_data(args) -> None:
    from .synthetic import make_demo_data

    info = make_demo_data(args.out, ids=args.ids, size=args.size, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in info.items()))


def _train(args) -> None:
    from .train import train

    params = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    print(train(make_config(**params)))


def _evaluate(args) -> None:
    from .evaluate import evaluate_checkpoint, format_summary

    metrics = evaluate_checkpoint(args.checkpoint, args.data_dir, args.image_root, split=args.split,
                                  out=args.out, embedding=args.embedding, batch_size=args.batch_size,
                                  gallery_n=args.gallery)
    print(format_summary(metrics))


def _verify(args) -> None:
    from .explain import verify

    verify(args.checkpoint, args.image_a, args.image_b, out=args.out, embedding=args.embedding)


def _demo(args) -> None:
    """The whole pipeline on synthetic twins with a tiny ViT on CPU: data, training, evaluation."""
    from .data import load_splits, verify_images
    from .evaluate import evaluate_checkpoint, format_summary
    from .synthetic import make_demo_data
    from .train import train

    out = Path(args.out)
    data = out / "data"
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always starts afresh
    t = time.monotonic()
    print(make_demo_data(data, ids=128, size=96, seed=0))
    for split in load_splits(data):
        verify_images(split)
    cfg = make_config(data_dir=str(data), output_dir=str(out / "run"), run_name="demo", resume="",
                      backbone="vit_tiny_patch16_224", pretrained=False, depth=4, img_size=96, epochs=args.epochs,
                      batch_size=32, lr=1e-3, warmup_epochs=1, drop_path=0.0, val_groups=6, amp=False)
    result = train(cfg)
    metrics = evaluate_checkpoint(result["best_checkpoint"], str(data))
    print(format_summary(metrics))
    print(f"demo finished in {time.monotonic() - t:.0f} s; outputs in {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options: python -m dcal_lib bench -h
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dcal_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-data", help="validate a dataset folder and print a summary")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-root")
    p.add_argument("--verify-images", action="store_true", help="decode every image up front")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("make-demo-data", help="write a synthetic twin dataset in the real format")
    p.add_argument("--out", required=True)
    p.add_argument("--ids", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_demo_data)

    p = sub.add_parser("train", help="train or continue a run; every Config field is a --name value option")
    for name in FIELDS:
        p.add_argument(f"--{name}", metavar=type(FIELDS[name].default).__name__.upper())
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="verification metrics, plots and embeddings of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-root")
    p.add_argument("--split", default="test")
    p.add_argument("--out")
    p.add_argument("--embedding", default="sa+glca", choices=["sa+glca", "sa", "glca"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gallery", type=int, default=4, help="hardest pairs of each kind drawn with attention maps")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("verify", help="same person or not: cosine score of two face images at the "
                       "checkpoint's threshold (validation twin EER), and the pair view as a PNG")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--out", help="PNG of the pair view; default <run dir>/verify/<a>__<b>.png")
    p.add_argument("--embedding", default="sa+glca", choices=["sa+glca", "sa", "glca"])
    p.set_defaults(func=_verify)

    p = sub.add_parser("demo", help="synthetic data -> tiny DCAL on CPU -> evaluation, in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=30)
    p.set_defaults(func=_demo)

    sub.add_parser("bench", help="DCAL vs the plain ViT: step/inference time ratios, memory, FLOPs, data rate")

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
