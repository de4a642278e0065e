"""The GPU path: compression, kill and bit-exact resume, slimming, throughput and NCCL, on a real CUDA device.

Skipped, with the reason shown in pytest's summary, where no GPU is visible; every other test pins
the CPU, so `make test` passes on GPU machines and CPU machines alike.
"""
import copy
import json
import os
import subprocess

import pytest
import torch

import uvc
from uvc.compress import CompressConfig, compress
from uvc.data import DataConfig
from uvc.engine import Schedule, compare_throughput
from uvc.search import SearchConfig

from conftest import random_plan, small_vit, straight_killed_resumed
from test_compress import tiny_vit
from test_device_dtype import search_tensors, stepped_search

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU visible: the GPU tests run on machines that have one")
CUDA = torch.device("cuda")
ENV = dict(os.environ, UVC_PROGRESS="0", OMP_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
CLI_CUDA = ["--device", "cuda", "--deterministic", "--train-limit", "512", "--val-limit", "256", "--test-limit", "256",
            "--batch-size", "64", "--search-epochs", "3", "--warmup-epochs", "0.5", "--post-epochs", "1"]


def test_compress_on_cuda_delivers_the_budget(tmp_path):
    cfg = CompressConfig(out=str(tmp_path), budget=0.5, device="cuda", throughput_batch=16, throughput_rounds=2,
                         post=Schedule(1, 6e-4), data=DataConfig(train_limit=512, val_limit=256, test_limit=256, batch_size=64),
                         search=SearchConfig(schedule=Schedule(3, 6e-4), warmup_epochs=0.5))
    report = compress(cfg, model=tiny_vit())
    assert 0.49 <= report["ratio"] <= 0.5 and report["device"].startswith("cuda")
    assert uvc.macs(uvc.load(tmp_path)) == report["macs"]
    assert report["throughput_dense"] > 0 and report["throughput"] > 0


def test_search_state_lives_on_the_gpu_device():
    gated, search = stepped_search(tiny_vit().to(CUDA))
    elsewhere = [k for k, v in search_tensors(search).items() if v.device.type != "cuda"]
    assert not elsewhere, elsewhere
    assert all(b.neuron_mask.device.type == "cuda" for b in gated.blocks)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_slim_on_cuda_equals_masked(dtype, tolerance):
    model = small_vit(seed=2).to(CUDA, dtype)
    plan = random_plan(model, torch.Generator().manual_seed(2), skip_prob=0.2)
    gated = uvc.make_compressible(copy.deepcopy(model))
    uvc.set_plan(gated, plan)
    slimmed = uvc.slim(model, plan)
    assert {p.device.type for p in slimmed.parameters()} == {"cuda"} and {p.dtype for p in slimmed.parameters()} == {dtype}
    x = torch.randn(8, 1, 28, 28, device=CUDA, dtype=dtype)
    with torch.no_grad():
        assert (gated.eval()(x).float() - slimmed(x).float()).abs().max().item() <= tolerance


def test_killed_cuda_run_resumes_bit_exactly(tmp_path):
    straight_killed_resumed(tiny_vit(), tmp_path, CLI_CUDA, ENV, timeout=300)


def test_throughput_on_cuda_times_both_models_alternately():
    model = small_vit().to(CUDA)
    slimmed = uvc.slim(model, uvc.budget.uniform_plan(model, 0.5))
    rates = compare_throughput({"dense": model, "slimmed": slimmed}, (1, 28, 28), 64, CUDA, rounds=2, seconds=0.2)
    assert all(r["median"] > 0 and len(r["rounds"]) == 2 for r in rates.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs; this machine has fewer")
def test_two_gpus_over_nccl_match_one(tmp_path):
    from test_distributed import compress_args, torchrun_args

    model_dir = tmp_path / "tiny"
    uvc.save(tiny_vit(), model_dir)
    args = compress_args(model_dir, tmp_path / "two")
    args[args.index("cpu")] = "cuda"
    two = subprocess.run(torchrun_args(*args), capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2 and 0.49 <= report["ratio"] <= 0.5
