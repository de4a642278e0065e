"""The `uvc` command: a thin argparse layer over the Python API."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import UVCError

log = logging.getLogger("uvc")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder with train/ and val/ class folders")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx .gz files (default: Debian's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=224, help="crop size for ImageFolder data")


def _data_config(a):
    from .data import DataConfig

    return DataConfig(data=a.data, root=a.data_root, batch_size=a.batch_size, train_limit=a.train_limit,
                      test_limit=a.test_limit, workers=a.workers, input_size=a.input_size)


def cmd_train_teacher(a) -> int:
    from .teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=a.out, epochs=a.epochs, lr=a.lr, seed=a.seed, device=a.device, resume=a.resume,
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


def build_parser() -> argparse.ArgumentParser:
    from .models import default_teacher_dir

    parser = argparse.ArgumentParser(prog="uvc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train the bundled Fashion-MNIST teacher from scratch")
    _add_data_args(t)
    t.add_argument("--out", default=str(default_teacher_dir()))
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train_teacher)

    m = sub.add_parser("macs", help="count a model's multiply-accumulates per image")
    m.add_argument("model", nargs="?", default=None, help="timm name or a folder saved by uvc (default: the bundled teacher)")
    m.add_argument("--checkpoint", default=None)
    m.set_defaults(func=cmd_macs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except UVCError as e:
        print(f"uvc: error: {e}", file=sys.stderr)
        return 2
