"""The `uvc` command: a thin argparse layer over the Python API; every default comes from the config dataclasses.

`torchrun --nproc_per_node=N -m uvc compress ...` runs the compression data-parallel on N processes.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

from . import distributed, export
from .adapters import adapter_for
from .compress import CompressConfig, compress
from .data import DataConfig
from .distill import KDConfig
from .engine import Schedule
from .errors import UVCError
from .flops import macs
from .info import describe
from .models import default_teacher_dir, load_model, param_count
from .resource import RESOURCES
from .search import ENDS, SKIP_MODES, STARTS, SearchConfig
from .teacher import TeacherConfig, train_teacher

log = logging.getLogger("uvc")

RECIPE_ARGS = ("mixup", "cutmix", "smoothing", "aa", "reprob")


def _add_data_args(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    """Where the data comes from; with `recipe`, also the training-recipe overrides (compress only)."""
    d = DataConfig()
    p.add_argument("--data", default=d.data, help="'fashion-mnist' or a folder with train/ and val/ class folders")
    p.add_argument("--data-root", default=d.root, help="folder with the Fashion-MNIST idx .gz files (default: Debian's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over torchrun's processes")
    p.add_argument("--train-limit", type=int, default=d.train_limit, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, default=d.val_limit, help="use only the first N validation images")
    p.add_argument("--test-limit", type=int, default=d.test_limit, help="use only the first N test images")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--input-size", type=int, default=d.input_size, help="crop size for ImageFolder data (default: the model's)")
    if not recipe:
        return
    default = "default: DeiT's %s for ImageFolder data, %s for Fashion-MNIST"
    p.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha, 0 for off; " + default % (0.8, 0))
    p.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha, 0 for off; " + default % (1.0, 0))
    p.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing; " + default % (0.1, 0))
    p.add_argument("--aa", default=d.aa, help="ImageFolder only: timm auto-augment policy or 'none' (default rand-m9-mstd0.5-inc1-mmax9)")
    p.add_argument("--reprob", type=float, default=d.reprob, help="ImageFolder only: random-erasing probability (default 0.25)")


def _data_config(a):
    return DataConfig(data=a.data, root=a.data_root, batch_size=a.batch_size, train_limit=a.train_limit,
                      val_limit=a.val_limit, test_limit=a.test_limit, workers=a.workers, input_size=a.input_size,
                      **{k: getattr(a, k) for k in RECIPE_ARGS if hasattr(a, k)})


def cmd_train_teacher(a) -> int:
    t = TeacherConfig()
    cfg = TeacherConfig(out=a.out, seed=a.seed, device=a.device, resume=a.resume, overwrite=a.overwrite, drop_path=a.drop_path, init=a.init,
                        schedule=Schedule(a.epochs, a.lr, t.schedule.weight_decay, a.warmup_epochs),
                        tutor=Schedule(a.tutor_epochs, a.tutor_lr, t.tutor.weight_decay, t.tutor.warmup_epochs),
                        tutor_alpha=a.tutor_alpha, tutor_from=a.tutor_from, data=_data_config(a))
    result = train_teacher(cfg)
    print(f"teacher test top-1: {result['top1']:.2f}% (validation {result['top1_val']:.2f}%)  (weights in {a.out})")
    return 0


def cmd_macs(a) -> int:
    model = load_model(a.model, checkpoint=a.checkpoint)
    print(f"{a.model or 'default teacher'}: {macs(model) / 1e6:.2f} M MACs, {param_count(model) / 1e6:.2f} M parameters")
    return 0


def cmd_info(a) -> int:
    print(describe(a.model, checkpoint=a.checkpoint))
    return 0


def cmd_export(a) -> int:
    model = load_model(a.model)
    result = export.export_onnx(model, a.onnx, overwrite=a.overwrite)
    print(f"{a.onnx}: batch axis dynamic, max |ONNX - PyTorch| = {result['max_abs_diff']:.1e} (checked in onnxruntime)")
    if a.dense:
        input_size = adapter_for(model).input_size(model)
        with tempfile.TemporaryDirectory() as tmp:
            dense_path = Path(tmp) / "dense.onnx"
            export.export_onnx(load_model(a.dense), dense_path, input_size)
            speed = export.compare_throughput(dense_path, a.onnx, input_size, a.batch_size, rounds=a.rounds,
                                              threads=a.threads)
        for name in ("dense", "slimmed"):
            r = speed[name]
            print(f"onnxruntime {name:>7}: {r['median']:8.0f} images/s (median of {a.rounds} rounds, "
                  f"{r['min']:.0f}-{r['max']:.0f}), batch {a.batch_size}, {speed['threads']} threads")
        print(f"speedup {speed['speedup_median']:.2f}x")
    return 0


def cmd_compress(a) -> int:
    c = CompressConfig()
    search = SearchConfig(schedule=Schedule(a.search_epochs, a.lr, c.search.schedule.weight_decay,
                                            c.search.schedule.warmup_epochs, c.search.schedule.lr_batch),
                          warmup_epochs=a.warmup_epochs, prune=not a.no_prune,
                          skip="both" if a.no_prune and a.skip == "none" else a.skip,
                          width_multiple=a.width_multiple, start=a.start, end=a.end)
    kd = KDConfig(kind="none" if a.no_kd else a.kd, alpha=a.kd_alpha, temperature=a.kd_temperature)
    cfg = CompressConfig(model=a.model, checkpoint=a.checkpoint, pretrained=a.pretrained, img_size=a.img_size,
                         teacher=a.teacher, num_classes=a.num_classes, budget=a.budget, resource=a.resource, out=a.out, data=_data_config(a), search=search, kd=kd,
                         post=Schedule(a.post_epochs if a.post_epochs is not None else 0.0 if a.one_shot else c.post.epochs,
                                       a.post_lr, c.post.weight_decay, c.post.warmup_epochs, c.post.lr_batch),
                         one_shot=a.one_shot, calibration_images=a.calibration_images,
                         seed=a.seed, device=a.device, resume=a.resume, overwrite=a.overwrite, checkpoint_every=a.checkpoint_every,
                         deterministic=a.deterministic)
    try:
        report = compress(cfg)
        if not distributed.is_main():
            return 0
    except KeyboardInterrupt:
        raise UVCError(f"interrupted; the same command with --resume goes on from the last checkpoint in {a.out}") from None
    finally:
        distributed.shutdown()
    print(f"R = {report['ratio']:.4f} of {report['macs_dense'] / 1e6:.2f} M MACs (budget {report['budget']}); "
          f"test top-1 {report['top1']:.2f}% vs teacher {report['top1_teacher']:.2f}% "
          f"(validation {report['top1_val']:.2f}%); {report['throughput_dense']:.0f} -> {report['throughput']:.0f} images/s")
    print(f"model, report.json and report.png in {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    C, T = CompressConfig(), TeacherConfig()  # the CLI's defaults are the API's

    parser = argparse.ArgumentParser(prog="uvc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train the bundled Fashion-MNIST teacher (from scratch, or on from --init)")
    _add_data_args(t)
    t.add_argument("--out", default=str(default_teacher_dir()))
    t.add_argument("--epochs", type=int, default=T.schedule.epochs)
    t.add_argument("--lr", type=float, default=T.schedule.lr)
    t.add_argument("--warmup-epochs", type=float, default=T.schedule.warmup_epochs)
    t.add_argument("--drop-path", type=float, default=T.drop_path, help="stochastic depth rate")
    t.add_argument("--init", default=T.init, help="continue from a teacher folder saved by an earlier run")
    t.add_argument("--tutor-epochs", type=int, default=T.tutor.epochs,
                   help="train a small convnet first for this many epochs and distil its labels into the ViT (DeiT)")
    t.add_argument("--tutor-alpha", type=float, default=T.tutor_alpha, help="weight of the tutor's labels")
    t.add_argument("--tutor-lr", type=float, default=T.tutor.lr)
    t.add_argument("--tutor-from", default=T.tutor_from, help="reuse the tutor kept in the folder of an earlier run")
    t.add_argument("--seed", type=int, default=T.seed)
    t.add_argument("--device", default=T.device)
    t.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the teacher or checkpoints already in --out")
    t.set_defaults(func=cmd_train_teacher)

    c = sub.add_parser("compress", help="compress a ViT to a MACs budget (default: the bundled teacher to 0.5)")
    c.add_argument("--model", default=C.model,
                   help="timm name, a folder saved by uvc or by transformers' save_pretrained, or omit for the bundled teacher")
    c.add_argument("--checkpoint", default=C.checkpoint, help="local weights (.safetensors/.pth) for a timm --model")
    c.add_argument("--pretrained", action="store_true", help="timm's released weights (needs network)")
    c.add_argument("--img-size", type=int, default=C.img_size,
                   help="build the timm --model at this image size; checkpoint position embeddings are resampled")
    c.add_argument("--teacher", default=C.teacher, help="distillation teacher (default: the input model)")
    c.add_argument("--num-classes", type=int, default=C.num_classes,
                   help="the data's class count, for a model trained for other classes (or a backbone): a new head is "
                        "fitted on its frozen features first, and that model is the teacher (transfer, then compress)")
    c.add_argument("--budget", type=float, default=C.budget, help="fraction of the dense model's MACs to keep, in (0, 1]")
    c.add_argument("--resource", choices=RESOURCES, default=C.resource,
                   help="what --budget is a fraction of: macs (compute per image) or params (model size)")
    c.add_argument("--out", default=C.out)
    _add_data_args(c, recipe=True)
    c.add_argument("--search-epochs", type=float, default=C.search.schedule.epochs)
    c.add_argument("--warmup-epochs", type=float, default=C.search.warmup_epochs,
                   help="search epochs before the counts and duals move")
    c.add_argument("--post-epochs", type=float, default=None,
                   help=f"KD post-training of the slimmed model (default {C.post.epochs:g}; 0 with --one-shot)")
    c.add_argument("--lr", type=float, default=C.search.schedule.lr,
                   help=f"weight learning rate during the search, per {C.search.schedule.lr_batch} images: it scales "
                        "linearly with --batch-size (for an ImageNet-pretrained ViT see docs/imagenet.md)")
    c.add_argument("--post-lr", type=float, default=C.post.lr, help=f"the same for post-training (per {C.post.lr_batch} images)")
    c.add_argument("--kd", choices=("soft", "hard"), default=C.kd.kind)
    c.add_argument("--kd-alpha", type=float, default=C.kd.alpha)
    c.add_argument("--kd-temperature", type=float, default=C.kd.temperature)
    c.add_argument("--skip", choices=SKIP_MODES, default=C.search.skip,
                   help="which skip gates to learn (default none: on the bundled teacher skipping cost accuracy, see BENCHMARKS.md)")
    c.add_argument("--width-multiple", type=int, default=C.search.width_multiple,
                   help="keep head and MLP widths at multiples of this (8 suits GPU kernels)")
    c.add_argument("--one-shot", action="store_true",
                   help="no search and no training: rank groups on calibration images, fit the budget, compensate "
                        "the layers that read removed groups by least squares, slim (add --post-epochs N for KD)")
    c.add_argument("--start", choices=STARTS, default=C.search.start,
                   help="how the search leaves the dense model: fade (the start plan's groups fade out) or compensate "
                        "(cut at once, what reads them refitted by least squares on --calibration-images)")
    c.add_argument("--end", choices=ENDS, default=C.search.end,
                   help="what post-training starts from: rewind (the input weights slimmed at the searched plan, "
                        "refitted by least squares on --calibration-images) or searched (the searched weights slimmed)")
    c.add_argument("--calibration-images", type=int, default=C.calibration_images,
                   help="unlabeled training images for --one-shot, --start compensate and --end rewind")
    c.add_argument("--no-prune", action="store_true", help="ablation: skipping only")
    c.add_argument("--no-kd", action="store_true", help="ablation: labels only")
    c.add_argument("--seed", type=int, default=C.seed)
    c.add_argument("--device", default=C.device, help="cpu, cuda, cuda:N or auto (under torchrun: one GPU per process)")
    c.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (its checkpoint)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the results or checkpoint of an earlier run in --out (never an input's folder)")
    c.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels: a resumed GPU run then ends bit-exactly where an unbroken one would")
    c.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every, help="also checkpoint every N steps")
    c.set_defaults(func=cmd_compress)

    m = sub.add_parser("macs", help="count a model's multiply-accumulates per image")
    m.add_argument("model", nargs="?", default=None, help="timm name or a folder saved by uvc (default: the bundled teacher)")
    m.add_argument("--checkpoint", default=None)
    m.set_defaults(func=cmd_macs)

    i = sub.add_parser("info", help="per block: what is kept, MACs and parameters; reachable budgets of a dense model")
    i.add_argument("model", nargs="?", default=None, help="timm name or a model folder (default: the bundled teacher)")
    i.add_argument("--checkpoint", default=None)
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="write a model to ONNX (dynamic batch), checked against PyTorch in onnxruntime")
    e.add_argument("model", help="a model folder (slimmed or not), a timm name, or a transformers folder")
    e.add_argument("--onnx", required=True, help="the .onnx file to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    e.add_argument("--dense", default=None,
                   help="also time this dense model against MODEL in onnxruntime, alternating (e.g. the model you compressed)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--rounds", type=int, default=5, help="timed rounds of >= 1 s each")
    e.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per core)")
    e.set_defaults(func=cmd_export)
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
    except OSError as e:
        print(f"uvc: error: {os_error_line(e)}", file=sys.stderr)
    return 2


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation: what, where, and what to do about it."""
    where = f" ({e.filename})" if e.filename else ""
    fixes = {errno.ENOSPC: "free space on that disk or write elsewhere (--out)",
             errno.EDQUOT: "free space within your quota or write elsewhere (--out)",
             errno.EACCES: "choose a path you may write to, or fix its permissions",
             errno.EPERM: "choose a path you may write to, or fix its permissions",
             errno.EROFS: "that file system is read-only: write elsewhere",
             errno.ENOENT: "check the path; create the folder it should be written in first",
             errno.EISDIR: "that is a folder: pass a file path",
             errno.ENOTDIR: "a part of that path is a file, not a folder: check the path"}
    reason = e.strerror or type(e).__name__
    return f"{reason}{where}: {fixes.get(e.errno, 'check the path and the disk, then run the command again')}"
