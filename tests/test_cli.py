"""The command line: a thin layer that prints results and turns UVCError into one clear line."""
import argparse
import re
import subprocess
import sys

import timm

import uvc
import uvc.budget
from uvc.cli import _config, build_parser, main
from uvc.compress import CompressConfig
from uvc.search import SearchConfig

from conftest import small_vit


def uvc_cli(*args):
    return subprocess.run([sys.executable, "-m", "uvc", *args], capture_output=True, text=True)


def test_macs_command_counts_a_timm_model_and_a_saved_folder(tmp_path):
    result = uvc_cli("macs", "deit_tiny_patch16_224")
    assert result.returncode == 0 and "1253.68 M MACs" in result.stdout
    uvc.save(timm.create_model("deit_tiny_patch16_224"), tmp_path)
    assert uvc_cli("macs", str(tmp_path)).stdout.split(":")[1] == result.stdout.split(":")[1]


def test_weights_file_as_model_gets_a_hint(tmp_path):
    result = uvc_cli("macs", str(tmp_path / "weights.pth"))
    assert result.returncode == 2 and "--checkpoint" in result.stderr


def test_help_lists_the_commands_and_the_version_without_loading_torch():
    out = uvc_cli("--help").stdout
    assert all(c in out for c in ("compress", "train-teacher", "macs"))
    assert uvc_cli("--version").stdout.strip() == f"uvc {uvc.__version__}"
    probe = ("import sys; from uvc.cli import main\n"
             "for argv in (['--help'], ['macs', '--help'], ['info', '--help'], ['--version']):\n"
             "    try: main(argv)\n    except SystemExit: pass\n"
             "print('heavy:', sorted({'torch', 'timm'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip().endswith("heavy: []"), result.stderr


def test_every_compress_and_teacher_option_shows_its_default():
    for command, defaults in (("compress", {"--budget": "0.5", "--out": "runs/compress", "--search-epochs": "1.0", "--lr": "0.0001"}),
                              ("train-teacher", {"--epochs": "12", "--lr": "0.001"})):
        p = next(a for a in build_parser(command)._actions if a.dest == "command").choices[command]
        assert all(a.help for a in p._actions)
        options = " ".join(p.format_help().split()).split("options:")[1]
        for flag, default in defaults.items():
            assert re.search(f"{flag} [A-Z_]+ .*?\\(default: ([^)]*)\\)", options).group(1) == default, flag
        shown = [a for a in p._actions if a.option_strings and a.default is not argparse.SUPPRESS and a.dest != "help"]
        assert options.count("(default: ") == len(shown)


def test_the_command_line_only_copies_values_into_the_api_config():
    def config(*argv):
        return _config(CompressConfig(), build_parser("compress").parse_args(["compress", *argv]))

    assert config() == CompressConfig()
    assert config("--one-shot") == CompressConfig(one_shot=True)  # the same post-training, none by default
    cfg = config("--lr", "3e-5", "--post-lr", "2e-5", "--width-multiple", "8", "--no-kd", "--no-prune", "--skip", "both",
                 "--batch-size", "64", "--img-size", "112")
    assert (cfg.search.schedule.lr, cfg.post.lr, cfg.search.width_multiple) == (3e-5, 2e-5, 8)  # both per 128 images
    assert (cfg.kd.kind, cfg.search.prune, cfg.search.skip, cfg.data.batch_size, cfg.img_size) == ("none", False, "both", 64, 112)
    cfg = config("--timing-rounds", "0", "--kd", "features", "--num-classes", "0")
    assert (cfg.throughput_rounds, cfg.kd.kind, cfg.num_classes) == (0, "features", 0)
    assert CompressConfig().keep_best and config("--keep-last") == CompressConfig(keep_best=False)
    assert config("--init", "activation", "--importance", "norm").search == SearchConfig(init="activation", importance="norm")


def test_macs_and_info_count_at_another_image_size(capsys):
    expected = uvc.macs(timm.create_model("deit_tiny_patch16_224", img_size=112)) / 1e6
    for command in ("macs", "info"):
        assert main([command, "deit_tiny_patch16_224", "--img-size", "112"]) == 0
        out = capsys.readouterr().out
        assert f"{expected:.2f} M MACs" in out and "3x112x112" in out


def test_export_writes_a_checked_onnx_file_and_times_it_against_the_dense_model(tmp_path):
    dense = small_vit(depth=2)
    uvc.save(dense, tmp_path / "dense")
    uvc.save(uvc.slim(dense, uvc.budget.uniform_plan(dense, 0.5)), tmp_path / "slim")
    result = uvc_cli("export", str(tmp_path / "slim"), "--onnx", str(tmp_path / "slim.onnx"),
                     "--dense", str(tmp_path / "dense"), "--rounds", "1", "--batch-size", "4", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "slim.onnx").stat().st_size > 10_000
    assert "max |ONNX - PyTorch|" in result.stdout and "speedup" in result.stdout
    assert "onnxruntime   dense" in result.stdout and "onnxruntime slimmed" in result.stdout
