"""Data-parallel compression under torchrun (gloo, 2 CPU processes), data shards, the DeiT recipe."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc import distributed
from uvc.data import DataConfig, TensorBatches, build_data
from uvc.distill import KDConfig, distillation_loss

from conftest import kill_after_first_checkpoint, same_weights
from test_compress import CLI_TINY, run_cli, tiny_vit

ENV = dict(os.environ, UVC_PROGRESS="0", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(*args, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", "-m", "uvc", *args]


def run_torchrun(*args):
    return subprocess.run(torchrun_args(*args), capture_output=True, text=True, env=ENV, timeout=300)


# ---- pieces ----------------------------------------------------------------------------------
def test_rank_shards_together_are_the_unsharded_batches():
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(96) % 10
    whole = TensorBatches(images, labels, 32, train=True, seed=4)
    shards = [TensorBatches(images, labels, 32, train=True, seed=4, shard=(r, 2)) for r in range(2)]
    for b in (whole, *shards):
        b.set_epoch(1)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert len(shards[0]) == len(whole) == 3
    with pytest.raises(uvc.UVCError, match="does not split evenly"):
        TensorBatches(images, labels, 33, train=True, shard=(0, 2))


def test_soft_targets_are_timm_soft_target_cross_entropy():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    plain = KDConfig(kind="none")
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert torch.allclose(distillation_loss(logits, one_hot, None, plain), distillation_loss(logits, labels, None, plain))
    _, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)(torch.randn(8, 3, 8, 8), labels)
    assert torch.allclose(distillation_loss(logits, soft, None, plain), SoftTargetCrossEntropy()(logits, soft))
    teacher = torch.randn(8, 5)
    assert torch.isfinite(distillation_loss(logits, soft, teacher, KDConfig(kind="soft")))


def test_recipe_defaults_depend_on_the_data():
    cfg = DataConfig()
    assert cfg.recipe(image_folder=False) == dict(mixup=0.0, cutmix=0.0, smoothing=0.0, aa=None, reprob=0.0)
    assert cfg.recipe(image_folder=True) == dict(mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1-mmax9", reprob=0.25)
    assert DataConfig(mixup=0.0, aa="none").recipe(image_folder=True)["aa"] is None
    with pytest.raises(uvc.UVCError, match="apply to ImageFolder data"):
        DataConfig(aa="rand-m9-mstd0.5-inc1").recipe(image_folder=False)


def _collectives_worker(rank: int, port: int) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.setup(torch.device("cpu"))
    try:
        assert (distributed.rank(), distributed.world_size()) == (rank, 2)
        assert torch.equal(distributed.all_reduce_mean_(torch.tensor([1.0, 2.0]) * (rank + 1)), torch.tensor([1.5, 3.0]))
        assert distributed.sum_over_ranks(rank + 1, 10) == [3, 20]
        assert distributed.broadcast_from_main({"rank": rank}) == {"rank": 0}
        distributed.same_on_all_ranks("state", [torch.ones(3), torch.zeros(2)])
        try:
            distributed.same_on_all_ranks("state", [torch.ones(3), torch.tensor([0.0, rank * 1e-7])])
        except uvc.UVCError as e:
            assert "rank(s) [1]" in str(e)
        else:
            raise AssertionError("a diverged rank went unnoticed")
    finally:
        distributed.shutdown()


def test_collectives_and_the_divergence_check():
    torch.multiprocessing.spawn(_collectives_worker, args=(free_port(),), nprocs=2)


# ---- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    uvc.save(tiny_vit(), folder)
    return folder


def compress_args(model_dir, out):
    return ["compress", "--model", str(model_dir), "--budget", "0.5", "--seed", "3", "--checkpoint-every", "2",
            "--out", str(out), *CLI_TINY]


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    result = run_torchrun(*compress_args(tiny_model, out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_two_processes_match_one_process(tiny_model, two_process_run, tmp_path):
    """Same global batch of 64 (2 x 32 vs 1 x 64), same data order and augmentation, same Gumbel draws.

    The two runs differ only in floating-point summation order (two half-batch means averaged by
    all-reduce vs one mean), so they should stay within float noise of each other: measured, the
    weights differ by < 1e-5 and the architecture, MACs and accuracy are equal. The tolerances leave
    room for that noise to flip a borderline decision elsewhere: identical architecture, MACs ratio
    within 0.01, top-1 within 3 points (about 8 of the 256 test images).
    """
    out_two, result = two_process_run
    assert "all 2 ranks hold the same search state and architecture" in result.stderr
    one = run_cli(*compress_args(tiny_model, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (tmp_path / "one", out_two))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["layers"] == r2["layers"]
    assert abs(r1["ratio"] - r2["ratio"]) <= 0.01 and 0.49 <= r2["ratio"] <= 0.5
    assert abs(r1["top1"] - r2["top1"]) <= 3.0
    assert len(r1["history"]) == len(r2["history"])  # the same number of steps: the batch is global
    assert sorted(p.name for p in out_two.iterdir()) == ["arch.json", "model.safetensors", "report.json", "report.png"]


def test_killed_two_process_run_resumes_to_the_same_model(tiny_model, two_process_run, tmp_path):
    out = tmp_path / "killed"
    # SIGTERM: torchrun passes it on to both workers, as a cluster's preemption would.
    kill_after_first_checkpoint(torchrun_args(*compress_args(tiny_model, out)), out, ENV, sig=signal.SIGTERM)
    resumed = run_torchrun(*compress_args(tiny_model, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    straight, _ = two_process_run
    assert same_weights(straight, out)


def write_image_folder(root, classes=("dark", "light"), per_class=8, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(60 + 130 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_with_the_deit_recipe_on_two_processes(tmp_path):
    write_image_folder(tmp_path / "images")
    data = build_data(DataConfig(data=str(tmp_path / "images"), batch_size=4, workers=0, input_size=32))
    assert data.mixup is not None and data.label_smoothing == 0.0  # the smoothing is in mixup's targets
    torch.manual_seed(0)
    uvc.save(VisionTransformer(img_size=32, patch_size=8, num_classes=2, embed_dim=64, depth=4, num_heads=2), tmp_path / "m")
    result = run_torchrun("compress", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "images"),
                          "--input-size", "32", "--workers", "0", "--batch-size", "4", "--budget", "0.5",
                          "--search-epochs", "3", "--warmup-epochs", "0.5", "--post-epochs", "1", "--reprob", "0.1",
                          "--device", "cpu", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0.49 <= report["ratio"] <= 0.5 and report["processes"] == 2
    assert max(h["step"] for h in report["history"] if h["phase"] == "search") == 12  # 16 images, 4 a step, 3 epochs
    assert report["config"]["data"]["aa"] is None  # left to the recipe: DeiT's for ImageFolder data
    assert report["config"]["data"]["reprob"] == 0.1


def test_image_folder_run_killed_mid_epoch_resumes_to_the_same_model(tmp_path, monkeypatch):
    """One process on ImageFolder data: a seeded sampler and seeded worker draws make a mid-epoch resume exact."""
    from uvc.compress import CompressConfig, Run, compress
    from uvc.engine import Schedule
    from uvc.search import SearchConfig

    write_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=2, embed_dim=64, depth=2, num_heads=2)

    def config(out, resume=False):
        return CompressConfig(out=str(out), budget=0.5, device="cpu", resume=resume, checkpoint_every=3,
                              throughput_batch=4, throughput_rounds=1, post=Schedule(1, 9.6e-3),
                              data=DataConfig(data=str(tmp_path / "images"), batch_size=4, workers=0),
                              search=SearchConfig(schedule=Schedule(2, 9.6e-3), warmup_epochs=0.5))

    compress(config(tmp_path / "straight"), model=model)
    original, count = Run.checkpoint, {"n": 0}

    def checkpoint_then_die(self):
        original(self)
        count["n"] += 1
        if count["n"] == 1:  # step 3 of 4 in the first epoch: mid-epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        compress(config(tmp_path / "killed"), model=model)
    monkeypatch.setattr(Run, "checkpoint", original)
    compress(config(tmp_path / "killed", resume=True), model=model)
    assert same_weights(tmp_path / "straight", tmp_path / "killed")
