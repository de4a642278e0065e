"""The `uvc` command: a thin argparse layer over the Python API.

`torchrun --nproc_per_node=N -m uvc compress ...` runs the compression data-parallel on N processes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UVCError

log = logging.getLogger("uvc")


RECIPE_ARGS = ("mixup", "cutmix", "smoothing", "aa", "reprob")


def _add_data_args(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    """Where the data comes from; with `recipe`, also the training-recipe overrides (compress only)."""
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder with train/ and val/ class folders")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx .gz files (default: Debian's)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over torchrun's processes")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=224, help="crop size for ImageFolder data")
    if not recipe:
        return
    default = "default: DeiT's %s for ImageFolder data, %s for Fashion-MNIST"
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha, 0 for off; " + default % (0.8, 0))
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, 0 for off; " + default % (1.0, 0))
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing; " + default % (0.1, 0))
    p.add_argument("--aa", default=None, help="ImageFolder only: timm auto-augment policy or 'none' (default rand-m9-mstd0.5-inc1)")
    p.add_argument("--reprob", type=float, default=None, help="ImageFolder only: random-erasing probability (default 0.25)")


def _data_config(a):
    from .data import DataConfig

    return DataConfig(data=a.data, root=a.data_root, batch_size=a.batch_size, train_limit=a.train_limit,
                      test_limit=a.test_limit, workers=a.workers, input_size=a.input_size,
                      **{k: getattr(a, k) for k in RECIPE_ARGS if hasattr(a, k)})


def cmd_train_teacher(a) -> int:
    from .teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=a.out, epochs=a.epochs, lr=a.lr, seed=a.seed, device=a.device, resume=a.resume,
                        warmup_epochs=a.warmup_epochs, drop_path=a.drop_path, init=a.init,
                        tutor_epochs=a.tutor_epochs, tutor_alpha=a.tutor_alpha, tutor_lr=a.tutor_lr,
                        tutor_from=a.tutor_from,
                        data=_data_config(a))
    result = train_teacher(cfg)
    print(f"teacher test top-1: {result['top1']:.2f}%  (weights in {a.out})")
    return 0


def cmd_macs(a) -> int:
    from .flops import macs
    from .models import load_model, param_count

    model = load_model(a.model, checkpoint=a.checkpoint)
    print(f"{a.model or 'default teacher'}: {macs(model) / 1e6:.2f} M MACs, {param_count(model) / 1e6:.2f} M parameters")
    return 0


def cmd_compress(a) -> int:
    from . import distributed
    from .compress import CompressConfig, compress
    from .distill import KDConfig
    from .primal_dual import SearchConfig

    search = SearchConfig(epochs=a.search_epochs, warmup_epochs=a.warmup_epochs, lr=a.lr, prune=not a.no_prune,
                          skip="none" if a.no_skip else a.skip)
    kd = KDConfig(kind="none" if a.no_kd else a.kd, alpha=a.kd_alpha, temperature=a.kd_temperature)
    cfg = CompressConfig(model=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained, teacher=a.teacher,
                         budget=a.budget, out=a.out, data=_data_config(a), search=search, kd=kd,
                         post_epochs=a.post_epochs, post_lr=a.post_lr, seed=a.seed, device=a.device,
                         resume=a.resume, checkpoint_every=a.checkpoint_every)
    try:
        report = compress(cfg)
        if not distributed.is_main():
            return 0
    finally:
        distributed.shutdown()
    print(f"R = {report['ratio']:.4f} of {report['macs_dense'] / 1e6:.2f} M MACs (budget {report['budget']}); "
          f"top-1 {report['top1']:.2f}% vs teacher {report['top1_teacher']:.2f}%; "
          f"{report['throughput_dense']:.0f} -> {report['throughput']:.0f} images/s")
    print(f"model, report.json and report.png in {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compress import CompressConfig
    from .distill import KDConfig
    from .models import default_teacher_dir
    from .primal_dual import SearchConfig
    from .teacher import TeacherConfig

    SEARCH, COMPRESS, KD = SearchConfig(), CompressConfig(), KDConfig()  # the CLI's defaults are the API's

    parser = argparse.ArgumentParser(prog="uvc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train the bundled Fashion-MNIST teacher (from scratch, or on from --init)")
    _add_data_args(t)
    t.add_argument("--out", default=str(default_teacher_dir()))
    t.add_argument("--epochs", type=int, default=TeacherConfig.epochs)
    t.add_argument("--lr", type=float, default=TeacherConfig.lr)
    t.add_argument("--warmup-epochs", type=float, default=TeacherConfig.warmup_epochs)
    t.add_argument("--drop-path", type=float, default=TeacherConfig.drop_path, help="stochastic depth rate")
    t.add_argument("--init", default=None, help="continue from a teacher folder saved by an earlier run")
    t.add_argument("--tutor-epochs", type=int, default=TeacherConfig.tutor_epochs,
                   help="train a small convnet first for this many epochs and distil its labels into the ViT (DeiT)")
    t.add_argument("--tutor-alpha", type=float, default=TeacherConfig.tutor_alpha, help="weight of the tutor's labels")
    t.add_argument("--tutor-lr", type=float, default=TeacherConfig.tutor_lr)
    t.add_argument("--tutor-from", default=None, help="reuse the tutor kept in the folder of an earlier run")
    t.add_argument("--seed", type=int, default=TeacherConfig.seed)
    t.add_argument("--device", default=TeacherConfig.device)
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train_teacher)

    c = sub.add_parser("compress", help="compress a ViT to a MACs budget (default: the bundled teacher to 0.5)")
    c.add_argument("--model", default=None, help="timm name, a folder saved by uvc, or omit for the bundled teacher")
    c.add_argument("--checkpoint", default=None, help="local weights (.safetensors/.pth) for a timm --model")
    c.add_argument("--pretrained", action="store_true", help="timm's released weights (needs network)")
    c.add_argument("--teacher", default=None, help="distillation teacher (default: the input model)")
    c.add_argument("--budget", type=float, default=COMPRESS.budget, help="fraction of the dense model's MACs to keep, in (0, 1]")
    c.add_argument("--out", default=COMPRESS.out)
    _add_data_args(c, recipe=True)
    c.add_argument("--search-epochs", type=float, default=SEARCH.epochs)
    c.add_argument("--warmup-epochs", type=float, default=SEARCH.warmup_epochs)
    c.add_argument("--post-epochs", type=float, default=COMPRESS.post_epochs)
    c.add_argument("--lr", type=float, default=SEARCH.lr, help="weight learning rate during the search")
    c.add_argument("--post-lr", type=float, default=COMPRESS.post_lr)
    c.add_argument("--kd", choices=("soft", "hard"), default=KD.kind)
    c.add_argument("--kd-alpha", type=float, default=KD.alpha)
    c.add_argument("--kd-temperature", type=float, default=KD.temperature)
    c.add_argument("--skip", choices=("both", "block", "halves"), default="both", help="which skip gates to learn")
    c.add_argument("--no-prune", action="store_true", help="ablation: skipping only")
    c.add_argument("--no-skip", action="store_true", help="ablation: pruning only")
    c.add_argument("--no-kd", action="store_true", help="ablation: labels only")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: one GPU per process)")
    c.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    c.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    c.set_defaults(func=cmd_compress)

    m = sub.add_parser("macs", help="count a model's multiply-accumulates per image")
    m.add_argument("model", nargs="?", default=None, help="timm name or a folder saved by uvc (default: the bundled teacher)")
    m.add_argument("--checkpoint", default=None)
    m.set_defaults(func=cmd_macs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    other_rank = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.WARNING if other_rank else logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except UVCError as e:
        print(f"uvc: error: {e}", file=sys.stderr)
        return 2
