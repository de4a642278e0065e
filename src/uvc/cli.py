"""The `uvc` command: a thin argparse layer over the Python API; every default comes from the config dataclasses.

Each option of `compress` and `train-teacher` is one field of CompressConfig / TeacherConfig: its default is
read from the dataclass and its value copied back, nothing else. torch and timm load only for the command that
runs or whose options are listed, so `uvc --help` and `uvc --version` answer at once.
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

from . import __version__
from .errors import UVCError

FIELD = "field:"  # the dest prefix of an option that is a config field, followed by the field's dotted path


def _field(p: argparse.ArgumentParser, defaults, path: str, *flags: str, **kwargs) -> None:
    """An option whose default is the field at dotted `path` of `defaults` and whose value `_config` copies there."""
    value = defaults
    for name in path.split("."):
        value = getattr(value, name)
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs["metavar"] = flags[-1].removeprefix("--").upper().replace("-", "_")
    p.add_argument(*flags, dest=FIELD + path, **{"default": value, **kwargs})


def _config(cfg, args: argparse.Namespace):
    """`cfg` (a config with its defaults) with every field option's value copied into its field."""
    from .presets import set_fields

    return set_fields(cfg, {key.removeprefix(FIELD): value for key, value in vars(args).items() if key.startswith(FIELD)})


def _data_options(p: argparse.ArgumentParser, cfg, recipe: bool = False) -> None:
    """Where the data comes from; with `recipe`, also the training-recipe overrides (compress only)."""
    _field(p, cfg, "data.data", "--data", help="'fashion-mnist' or a folder with train/ and val/ class folders")
    _field(p, cfg, "data.root", "--data-root", help="folder with the Fashion-MNIST idx .gz files (None: Debian's)")
    _field(p, cfg, "data.batch_size", "--batch-size", type=int, help="global batch, split over torchrun's processes")
    _field(p, cfg, "data.train_limit", "--train-limit", type=int, help="use only the first N training images")
    _field(p, cfg, "data.val_limit", "--val-limit", type=int, help="use only the first N validation images")
    _field(p, cfg, "data.test_limit", "--test-limit", type=int, help="use only the first N test images")
    _field(p, cfg, "data.workers", "--workers", type=int, help="data-loading processes")
    _field(p, cfg, "data.input_size", "--input-size", type=int, help="crop size for ImageFolder data (None: the model's)")
    _field(p, cfg, "data.mean", "--mean", type=float, nargs="+",
           help="normalisation mean, one value or one per channel (None: the model's)")
    _field(p, cfg, "data.std", "--std", type=float, nargs="+",
           help="normalisation std, one value or one per channel (None: the model's)")
    _field(p, cfg, "data.interpolation", "--interpolation", help="resize: bilinear, bicubic or nearest (None: the model's)")
    _field(p, cfg, "data.crop_pct", "--crop-pct", type=float,
           help="ImageFolder only: evaluation centre-crop fraction (None: the model's)")
    if not recipe:
        return
    data = "None: DeiT's %s for ImageFolder data, %s for Fashion-MNIST"
    _field(p, cfg, "data.mixup", "--mixup", type=float, help="mixup alpha, 0 for off; " + data % (0.8, 0))
    _field(p, cfg, "data.cutmix", "--cutmix", type=float, help="cutmix alpha, 0 for off; " + data % (1.0, 0))
    _field(p, cfg, "data.smoothing", "--smoothing", type=float, help="label smoothing; " + data % (0.1, 0))
    _field(p, cfg, "data.aa", "--aa",
           help="ImageFolder only: timm auto-augment policy or 'none' (None: rand-m9-mstd0.5-inc1-mmax9)")
    _field(p, cfg, "data.reprob", "--reprob", type=float, help="ImageFolder only: random-erasing probability (None: 0.25)")


def _teacher_options(p: argparse.ArgumentParser) -> None:
    from .engine import LR_BATCH
    from .teacher import TeacherConfig

    t = TeacherConfig()
    _data_options(p, t)
    _field(p, t, "out", "--out", help="folder for the teacher's weights")
    _field(p, t, "schedule.epochs", "--epochs", type=int, help="ViT training epochs")
    _field(p, t, "schedule.lr", "--lr", type=float, help=f"ViT learning rate per {LR_BATCH} images, scaled with --batch-size")
    _field(p, t, "schedule.warmup_epochs", "--warmup-epochs", type=float, help="linear warm-up before the cosine decay")
    _field(p, t, "drop_path", "--drop-path", type=float, help="stochastic depth rate")
    _field(p, t, "init", "--init", help="continue from a teacher folder saved by an earlier run")
    _field(p, t, "tutor.epochs", "--tutor-epochs", type=int,
           help="train a small convnet first for this many epochs and distil its labels into the ViT (DeiT)")
    _field(p, t, "tutor_alpha", "--tutor-alpha", type=float, help="weight of the tutor's labels")
    _field(p, t, "tutor.lr", "--tutor-lr", type=float, help=f"the tutor's learning rate per {LR_BATCH} images")
    _field(p, t, "tutor_from", "--tutor-from", help="reuse the tutor kept in the folder of an earlier run")
    _field(p, t, "seed", "--seed", type=int, help="random seed")
    _field(p, t, "device", "--device", help="cpu, cuda, cuda:N or auto")
    _field(p, t, "resume", "--resume", action="store_true", help="continue the unfinished run in --out")
    _field(p, t, "overwrite", "--overwrite", action="store_true", help="replace the teacher or checkpoints already in --out")


def _compress_options(p: argparse.ArgumentParser, preset: str | None = None) -> None:
    """With a `preset`, every option's default is the preset's value, so only options given explicitly override it."""
    from .compress import CompressConfig
    from .distill import KD_KINDS, KD_REDUCTIONS
    from .engine import LR_BATCH
    from .presets import PRESETS
    from .resource import RESOURCES
    from .search import DUALS, ENDS, GATE_KINDS, IMPORTANCE, INITS, SKIP_MODES, STARTS

    c = CompressConfig.from_preset(preset) if preset else CompressConfig()
    p.add_argument("--preset", choices=tuple(PRESETS), default=preset,
                   help="start from a preset's values (paper: UVC as published; docs/method.md, Presets); every option "
                        "given explicitly overrides them, and `--preset paper --help` shows the preset's values as defaults")
    _field(p, c, "model", "--model",
           help="timm name, a folder saved by uvc or by transformers' save_pretrained (None: the bundled teacher)")
    _field(p, c, "checkpoint", "--checkpoint", help="local weights (.safetensors/.pth) for a timm --model")
    _field(p, c, "pretrained", "--pretrained", action="store_true", help="timm's released weights (needs network)")
    _field(p, c, "img_size", "--img-size", type=int,
           help="build the timm --model at this image size; checkpoint position embeddings are resampled")
    _field(p, c, "teacher", "--teacher", help="distillation teacher (None: the input model)")
    _field(p, c, "num_classes", "--num-classes", type=int,
           help="the data's class count, for a model trained for other classes (or a backbone): a new head is "
                "fitted on its frozen features first, and that model is the teacher (transfer, then compress); 0 drops "
                "the head and compresses the model as a backbone, by distilling its features (no labels needed)")
    _field(p, c, "budget", "--budget", type=float, help="fraction of the dense model's --resource to keep, in (0, 1]")
    _field(p, c, "resource", "--resource", choices=tuple(RESOURCES),
           help="what --budget is a fraction of: macs (compute per image), params (model size) or latency (time "
                "measured on --device at --latency-batch and --latency-threads, from a table built and cached in --out)")
    _field(p, c, "throughput_batch", "--throughput-batch", type=int, help="images per timed call of the final speed timing")
    _field(p, c, "latency.table", "--latency-table", help="reuse this latency_table.json (measured with the same device, "
           "dtype, batch, threads, torch and model; None: the one cached in --out, or a new one)")
    _field(p, c, "latency.batch", "--latency-batch", type=int, help="images per timed call for latency (None: --throughput-batch)")
    _field(p, c, "latency.threads", "--latency-threads", type=int, help="CPU threads for latency timings (None: torch's count)")
    _field(p, c, "latency.rounds", "--latency-rounds", type=int, help="alternating rounds over the latency table's entries")
    _field(p, c, "latency.seconds", "--latency-seconds", type=float, help="seconds per table entry and round")
    _field(p, c, "out", "--out", help="folder for the model, report.json, report.png and the checkpoint")
    _data_options(p, c, recipe=True)
    _field(p, c, "search.schedule.epochs", "--search-epochs", type=float, help="epochs of the UVC search")
    _field(p, c, "search.warmup_epochs", "--warmup-epochs", type=float, help="search epochs before the counts and duals move")
    after_search, after_one_shot = (CompressConfig(one_shot=o).post_training().epochs for o in (False, True))
    _field(p, c, "post.epochs", "--post-epochs", type=float,
           help=f"KD post-training of the slimmed model (None: {after_search:g} after a search, {after_one_shot:g} with --one-shot)")
    _field(p, c, "search.schedule.lr", "--lr", type=float,
           help=f"weight learning rate during the search, per {LR_BATCH} images: it scales linearly with "
                "--batch-size (for an ImageNet-pretrained ViT see docs/imagenet.md)")
    _field(p, c, "post.lr", "--post-lr", type=float, help=f"the same for post-training, per {LR_BATCH} images")
    _field(p, c, "kd.kind", "--kd", choices=KD_KINDS,
           help="distillation from the teacher: its logits (soft, hard) or its features (pooled and tokens, by cosine; "
                "what a backbone always takes)")
    _field(p, c, "kd.alpha", "--kd-alpha", type=float, help="weight of the distillation term")
    _field(p, c, "kd.temperature", "--kd-temperature", type=float, help="softmax temperature of soft distillation")
    _field(p, c, "search.skip", "--skip", choices=SKIP_MODES,
           help="which skip gates to learn; auto: both under a latency budget at batch 1 (--resource latency "
                "--latency-batch 1), where they won, none elsewhere, where they cost accuracy (BENCHMARKS.md section 8)")
    _field(p, c, "search.width_multiple", "--width-multiple", type=int,
           help="keep head and MLP widths at multiples of this, in every plan, --one-shot's too (8 suits GPU kernels)")
    _field(p, c, "one_shot", "--one-shot", action="store_true",
           help="no search and no training: rank groups on calibration images, fit the budget, compensate "
                "the layers that read removed groups by least squares, slim (add --post-epochs N for KD)")
    _field(p, c, "search.start", "--start", choices=STARTS,
           help="how the search leaves the dense model: fade (the start plan's groups fade out) or compensate "
                "(cut at once, what reads them refitted by least squares on --calibration-images)")
    _field(p, c, "search.init", "--init", choices=INITS,
           help="the plan the search starts from: uniform (one keep fraction everywhere) or activation (--one-shot's "
                "allocation on --calibration-images)")
    _field(p, c, "search.importance", "--importance", choices=IMPORTANCE,
           help="what ranks the groups inside each block: taylor (the loss's sensitivity, measured during the search), "
                "activation (weight norm x mean squared activation on --calibration-images) or norm (weight norms)")
    _field(p, c, "search.end", "--end", choices=ENDS,
           help="what post-training starts from: rewind (the input weights slimmed at the searched plan, "
                "refitted by least squares on --calibration-images) or searched (the searched weights slimmed)")
    _field(p, c, "search.dual", "--dual", choices=DUALS,
           help="price: z is the price the counts imply, counts kept on the budget; ascent: the paper's Lagrangian "
                "gradient steps on the ratios and gradient ascent on z")
    _field(p, c, "search.gates", "--gates", choices=GATE_KINDS,
           help="skip gates in training: hard decisions, or the paper's Gumbel-sigmoid samples (with --skip)")
    _field(p, c, "kd.reduction", "--kd-reduction", choices=KD_REDUCTIONS,
           help="soft KD's KL per sample, or per sample and class (element: DeiT's and the paper's code's)")
    _field(p, c, "search.schedule.clip_grad", "--clip-grad", type=float,
           help="clip the weights' gradient norm to this during the search (0: off)")
    _field(p, c, "post.clip_grad", "--post-clip-grad", type=float, help="the same for post-training")
    _field(p, c, "calibration_images", "--calibration-images", type=int,
           help="unlabeled training images for --one-shot, --init and --importance activation, --start compensate and "
                "--end rewind")
    _field(p, c, "search.prune", "--no-prune", action="store_false", default=argparse.SUPPRESS,
           help="ablation: skipping only (with --skip both, block or halves); pruning is on without it")
    _field(p, c, "keep_best", "--keep-last", action="store_false", default=argparse.SUPPRESS,
           help="deliver the last post-training epoch's model; without it, the best on validation of the slimmed model "
                "and each post-training epoch")
    _field(p, c, "kd.kind", "--no-kd", action="store_const", const="none", default=argparse.SUPPRESS,
           help="ablation: labels only, the same as --kd none")
    _field(p, c, "seed", "--seed", type=int, help="random seed")
    _field(p, c, "device", "--device", help="cpu, cuda, cuda:N or auto (under torchrun: one GPU per process)")
    _field(p, c, "resume", "--resume", action="store_true", help="continue the unfinished run in --out (its checkpoint)")
    _field(p, c, "overwrite", "--overwrite", action="store_true",
           help="replace the results or checkpoint of an earlier run in --out (never an input's folder)")
    _field(p, c, "deterministic", "--deterministic", action="store_true",
           help="deterministic GPU kernels: a resumed GPU run then ends bit-exactly where an unbroken one would")
    _field(p, c, "checkpoint_every", "--checkpoint-every", type=int, help="also checkpoint every N steps (0: only at epoch ends)")
    _field(p, c, "throughput_rounds", "--timing-rounds", type=int,
           help="after saving, time the dense and the slimmed model in this many alternating rounds of 1 s; a latency "
                "budget's measured checks take as many (0: no timing, and a latency budget trusts its table)")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model to describe or count: macs and info."""
    p.add_argument("model", nargs="?", default=None, help="timm name or a model folder (None: the bundled teacher)")
    p.add_argument("--checkpoint", default=None, help="local weights (.safetensors/.pth) for a timm model")
    p.add_argument("--img-size", type=int, default=None,
                   help="build the timm model at this image size and count at that resolution (None: its own)")


def _info_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--latency", action="store_true",
                   help="also measure latency on this CPU (a dense model: its latency table, per block; takes a minute)")
    p.add_argument("--latency-batch", type=int, default=64, help="images per timed call")
    p.add_argument("--latency-threads", type=int, default=None, help="CPU threads while timing (None: torch's count)")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder (slimmed or not), a timm name, or a transformers folder")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    p.add_argument("--dense", default=None,
                   help="also time this dense model against MODEL in onnxruntime, alternating (e.g. the model you compressed)")
    p.add_argument("--batch-size", type=int, default=64, help="images per timed call")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of >= 1 s each")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (None: one per core)")


def cmd_train_teacher(a) -> int:
    from .teacher import TeacherConfig, train_teacher

    cfg = _config(TeacherConfig(), a)
    result = train_teacher(cfg)
    print(f"teacher test top-1: {result['top1']:.2f}% (validation {result['top1_val']:.2f}%)  (weights in {cfg.out})")
    return 0


def _timm_kwargs(a) -> dict:
    return {"img_size": a.img_size} if a.img_size else {}


def cmd_macs(a) -> int:
    from .adapters import adapter_for
    from .flops import macs
    from .models import load_model, param_count

    model = load_model(a.model, checkpoint=a.checkpoint, **_timm_kwargs(a))
    size = "x".join(map(str, adapter_for(model).input_size(model)))
    print(f"{a.model or 'default teacher'}: {macs(model) / 1e6:.2f} M MACs, {param_count(model) / 1e6:.2f} M parameters "
          f"({size} input)")
    return 0


def cmd_info(a) -> int:
    from .info import describe

    from .latency import LatencyConfig

    latency = LatencyConfig(batch=a.latency_batch, threads=a.latency_threads) if a.latency else None
    if latency is not None:
        latency.validate()
    print(describe(a.model, checkpoint=a.checkpoint, latency=latency, **_timm_kwargs(a)))
    return 0


def cmd_export(a) -> int:
    from . import export
    from .adapters import adapter_for
    from .models import load_model

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
    from . import distributed
    from .compress import CompressConfig, compress
    from .report import outcome, speed_text

    cfg = _config(CompressConfig.from_preset(a.preset) if a.preset else CompressConfig(), a)
    try:
        report = compress(cfg)
        if not distributed.is_main():
            return 0
    except KeyboardInterrupt:
        raise UVCError(f"interrupted; the same command with --resume goes on from the last checkpoint in {cfg.out}") from None
    finally:
        distributed.shutdown()
    dense = {"macs": f"{report['macs_dense'] / 1e6:.2f} M MACs", "params": f"{report['params_dense'] / 1e6:.2f} M parameters",
             "latency": "the dense model's latency (its table)"}[report["resource"]]
    print(f"R = {report['ratio']:.4f} of {dense} (budget {report['budget']}); {outcome(report)}; {speed_text(report)}")
    print(f"model, report.json and report.png in {cfg.out}")
    return 0


# name: (one line of help, the options, the command)
COMMANDS = {
    "train-teacher": ("train the bundled Fashion-MNIST teacher (from scratch, or on from --init)", _teacher_options,
                      cmd_train_teacher),
    "compress": ("compress a ViT to a MACs budget (default: the bundled teacher to 0.5)", _compress_options, cmd_compress),
    "macs": ("count a model's multiply-accumulates per image", _model_options, cmd_macs),
    "info": ("per block: what is kept, MACs and parameters; reachable budgets of a dense model", _info_options, cmd_info),
    "export": ("write a model to ONNX (dynamic batch), checked against PyTorch in onnxruntime", _export_options, cmd_export),
}


def build_parser(command: str | None = None, preset: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are added, so listing the commands loads no config (and no torch).
    `preset` (compress only) makes a preset's values the options' defaults."""
    parser = argparse.ArgumentParser(prog="uvc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level log lines")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_options, run) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:
            add_options(p, preset) if preset else add_options(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # uvc's own options take no value
    args = build_parser(command, _preset_in(argv) if command == "compress" else None).parse_args(argv)
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


def _preset_in(argv: list[str]) -> str | None:
    """The known preset named by `--preset NAME` or `--preset=NAME` (an unknown one is left to argparse to refuse)."""
    from .presets import PRESETS

    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--preset" and i + 1 < len(argv) else arg.removeprefix("--preset=")
        if arg.startswith("--preset") and name in PRESETS:
            return name
    return None


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
