"""Hostile and careless inputs: nothing a user points uvc at runs code, mislabels data or replaces a result.

Each case checks what a user sees (exit code 2, one line, no traceback) and what is left on disk.
Model files (arch.json, Hugging Face folders) are tests/test_hostile_models.py's.
"""
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc import checkpoint
from uvc.compress import CHECKPOINT, CompressConfig, compress
from uvc.data import DataConfig, build_data
from uvc.engine import Schedule
from uvc.io import read_tensors
from uvc.rundir import claimed
from uvc.search import SearchConfig

PIPELINE = importlib.import_module("uvc.compress")  # the module: `uvc.compress` is also the function
CLI_ENV = {**os.environ, "UVC_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "uvc", *args], capture_output=True, text=True, env=CLI_ENV)


def assert_one_line_refusal(result, *phrases):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def tiny_config(out, **changes):
    return CompressConfig(out=str(out), budget=0.5, device="cpu", throughput_batch=8, throughput_rounds=1,
                          post=Schedule(1, 3e-4), test_at_end=False,
                          data=DataConfig(train_limit=128, val_limit=64, test_limit=64, batch_size=32),
                          search=SearchConfig(schedule=Schedule(1, 3e-4), warmup_epochs=0.25), **changes)


class Planted:
    """A pickle that creates `marker` when unpickled: what a shared, hostile checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    uvc.save(tiny_vit(), path)
    return path


@pytest.mark.parametrize("command, name", [("compress", "checkpoint.pt"), ("compress", CHECKPOINT),
                                           ("train-teacher", "checkpoint.pt")])
def test_a_planted_pickle_checkpoint_is_refused_and_never_runs(tmp_path, model_dir, command, name):
    out, marker = tmp_path / "out", tmp_path / "owned"
    out.mkdir()
    (out / name).write_bytes(pickle.dumps({"model": Planted(marker)}))
    args = ["--model", str(model_dir)] if command == "compress" else []
    result = run_cli(command, *args, "--out", str(out), "--resume", "--device", "cpu", "--train-limit", "64",
                     "--batch-size", "32")
    assert_one_line_refusal(result, str(out / name))
    assert not marker.exists()
    assert os.listdir(out) == [name]


def interrupted_run(out: Path, monkeypatch, saves: int) -> None:
    """Start a tiny compression and stop it (as Ctrl-C would) right after its `saves`-th checkpoint."""
    written = []
    original = checkpoint.save_checkpoint

    def save_then_stop(path, state):
        original(path, state)
        written.append(path)
        if len(written) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(PIPELINE, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_config(out, checkpoint_every=1), model=tiny_vit())
    monkeypatch.setattr(PIPELINE, "save_checkpoint", original)


def flip_bytes(path: Path, count: int = 4096) -> None:
    """Invert `count` bytes inside the tensor data (the end of a safetensors file), leaving the header readable."""
    data = bytearray(path.read_bytes())
    start = len(data) - count - 16
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_resume_refuses_every_changed_setting_by_name_and_survives_a_damaged_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch, saves=2)
    newest, kept = out / CHECKPOINT, checkpoint.previous(out / CHECKPOINT)
    assert newest.exists() and kept.exists()

    with pytest.raises(uvc.UVCError, match="unfinished run") as refused:
        compress(tiny_config(out), model=tiny_vit())
    assert "--resume" in str(refused.value)

    changed = tiny_config(out, resume=True, seed=1)
    changed.post.lr, changed.kd.alpha = 1e-3, 0.9
    with pytest.raises(uvc.UVCError) as refused:
        compress(changed, model=tiny_vit())
    for setting in ("seed: 0 -> 1", "post.lr: 0.0003 -> 0.001", "kd.alpha: 0.5 -> 0.9"):
        assert setting in str(refused.value)
    with pytest.raises(uvc.UVCError, match="weights of the model"):
        compress(tiny_config(out, resume=True), model=tiny_vit(seed=1))

    # Flipped bytes in the newest checkpoint: the digest catches them and the run goes on from the one kept.
    flip_bytes(newest)
    with pytest.raises(uvc.UVCError, match="digest"):
        read_tensors(newest)
    report = compress(tiny_config(out, resume=True), model=tiny_vit())
    assert 0.49 <= report["ratio"] <= 0.5 and (out / "model.safetensors").exists()
    assert not newest.exists() and not kept.exists()  # a finished run keeps no checkpoint


def test_a_checkpoint_with_both_copies_damaged_is_refused_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch, saves=2)
    for path in (out / CHECKPOINT, checkpoint.previous(out / CHECKPOINT)):
        flip_bytes(path)
    with pytest.raises(uvc.UVCError) as refused:
        compress(tiny_config(out, resume=True), model=tiny_vit())
    assert len(str(refused.value).splitlines()) == 1 and "--overwrite" in str(refused.value)


def test_a_crafted_checkpoint_architecture_is_checked_before_it_is_built(tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(out, monkeypatch, saves=7)
    state = checkpoint.load_checkpoint(out / CHECKPOINT)
    assert state["run"]["phase"] == "post"
    state["arch"]["layers"][0]["hidden"] += 1
    checkpoint.save_checkpoint(out / CHECKPOINT, state)  # a valid digest: a digest catches damage, not intent
    with pytest.raises(uvc.UVCError, match=r"layers\[0\]\.hidden"):
        compress(tiny_config(out, resume=True), model=tiny_vit())


def test_an_earlier_runs_results_and_the_input_folder_are_never_replaced(tmp_path, model_dir):
    done = tmp_path / "done"
    done.mkdir()
    (done / "report.json").write_text("{}")
    with pytest.raises(uvc.UVCError, match="results of an earlier run"):
        compress(tiny_config(done), model=tiny_vit())
    assert (done / "report.json").read_text() == "{}"

    before = (model_dir / "model.safetensors").read_bytes()
    for out in (model_dir, model_dir / "inside"):
        result = run_cli("compress", "--model", str(model_dir), "--out", str(out), "--device", "cpu")
        assert_one_line_refusal(result, "which this run reads")
    assert (model_dir / "model.safetensors").read_bytes() == before and not (model_dir / "inside").exists()


def test_a_second_run_on_a_locked_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "busy"
    with claimed(out):
        with pytest.raises(uvc.UVCError, match=f"pid {os.getpid()}"):
            compress(tiny_config(out), model=tiny_vit())
    assert not out.exists()  # the lock's holder wrote nothing, so nothing is left behind


def test_export_replaces_nothing_and_os_errors_are_one_line(tmp_path, model_dir):
    target = tmp_path / "model.onnx"
    target.write_text("a file the user keeps")
    assert_one_line_refusal(run_cli("export", str(model_dir), "--onnx", str(target)), "--overwrite")
    assert target.read_text() == "a file the user keeps"
    assert_one_line_refusal(run_cli("export", str(model_dir), "--onnx", str(tmp_path / "missing" / "m.onnx")),
                            str(tmp_path / "missing"))
    assert_one_line_refusal(run_cli("export", str(model_dir), "--onnx", str(tmp_path)))


@pytest.mark.parametrize("flag", ["--search-epochs", "--post-epochs", "--warmup-epochs", "--lr", "--kd-temperature"])
def test_a_number_that_is_not_finite_is_refused_before_anything_is_written(tmp_path, model_dir, flag):
    out = tmp_path / "out"
    result = run_cli("compress", "--model", str(model_dir), "--out", str(out), "--device", "cpu", flag, "nan")
    assert_one_line_refusal(result, flag, "finite")
    assert not out.exists()


def test_image_folder_splits_with_other_classes_are_refused_naming_them(tmp_path):
    from PIL import Image

    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for split, classes in (("train", ("ant", "bee")), ("val", ("bee", "cow"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            image.save(tmp_path / split / name / "0.png")
    with pytest.raises(uvc.UVCError, match=r"only in train/: ant; only in val/: cow"):
        build_data(DataConfig(data=str(tmp_path), input_size=8, workers=0))


def test_saved_weights_that_do_not_match_their_arch_json_are_refused(tmp_path, model_dir):
    other = tmp_path / "other"
    uvc.save(tiny_vit(seed=1), other)
    (model_dir / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(uvc.UVCError, match="arch.json"):
        uvc.load(model_dir)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, model_dir, monkeypatch, capsys):
    import errno

    from uvc.cli import main

    def disk_full(model, args, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    out = tmp_path / "exports"
    out.mkdir()
    assert main(["export", str(model_dir), "--onnx", str(out / "m.onnx")]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "No space left on device" in message and "free space" in message
    assert list(out.iterdir()) == []  # neither the file nor its temporary part
