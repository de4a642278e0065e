"""The command line: a thin layer that prints results and turns UVCError into one clear line."""
import subprocess
import sys

import timm

import uvc
import uvc.budget

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


def test_help_lists_the_commands():
    out = uvc_cli("--help").stdout
    assert all(c in out for c in ("compress", "train-teacher", "macs"))


def test_info_shows_what_each_block_keeps_and_the_reachable_budgets(tmp_path):
    dense = uvc_cli("info", "deit_tiny_patch16_224")
    assert dense.returncode == 0, dense.stderr
    assert "3 x 64" in dense.stdout and "768" in dense.stdout and "1253.68 M MACs" in dense.stdout
    assert "reachable budgets" in dense.stdout and "with skipping alone" in dense.stdout
    model = timm.create_model("deit_tiny_patch16_224")
    plan = uvc.budget.uniform_plan(model, 0.5)
    uvc.save(uvc.slim(model, plan), tmp_path / "s")
    slimmed = uvc_cli("info", str(tmp_path / "s"))
    assert slimmed.returncode == 0 and "slimmed" in slimmed.stdout and "reachable" not in slimmed.stdout
    width = len(plan[0].dims[0])
    assert f"3 x {width}" in slimmed.stdout and str(len(plan[0].neurons)) in slimmed.stdout
    assert f"{uvc.macs(uvc.load(tmp_path / 's')) / 1e6:.2f} M MACs" in slimmed.stdout


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
