"""The command line: a thin layer that prints results and turns UVCError into one clear line."""
import subprocess
import sys

import timm

import uvc


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


def test_help_lists_the_commands():
    out = uvc_cli("--help").stdout
    assert all(c in out for c in ("compress", "train-teacher", "macs"))
