"""Shared test helpers: small real models and an independent MACs counter (fvcore)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import set_fused_attn

import uvc
from uvc.checkpoint import checkpoint_exists

os.environ.setdefault("UVC_PROGRESS", "0")
torch.set_num_threads(int(os.environ.get("UVC_TEST_THREADS", "1")))


def unfused(model: torch.nn.Module) -> torch.nn.Module:
    """Make every attention layer use explicit matmuls, so fvcore can see and count them."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def fvcore_macs(model: torch.nn.Module, input_size, exclude_norms: bool = True) -> int:
    """fvcore's count; norms excluded by default because uvc's resource model leaves them out (docs/method.md)."""
    from fvcore.nn import FlopCountAnalysis

    was_fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    unfused(model)
    try:
        analysis = FlopCountAnalysis(model.eval(), torch.randn(1, *input_size))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        total = analysis.total()
        if exclude_norms:
            total -= analysis.by_operator().get("layer_norm", 0)
        return int(total)
    finally:
        for m, fused in was_fused.items():
            m.fused_attn = fused


def kill_after_first_checkpoint(command: list[str], out: Path, env: dict, sig=signal.SIGKILL,
                                timeout: float = 120) -> None:
    """Start `command`, wait until it has written out/checkpoint.safetensors and run on a little, then send `sig`.

    Asserts that the kill landed mid-run: the checkpoint is there and the final model is not.
    """
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + timeout
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # past the first checkpoint, so the kill lands mid-run
    proc.send_signal(sig)
    proc.wait(timeout=60)
    # A kill during a save leaves only the kept previous checkpoint, from which --resume goes on.
    assert checkpoint_exists(ckpt) and not (out / "model.safetensors").exists(), "the run ended before it could be killed"


def same_weights(a: Path, b: Path) -> bool:
    """Two saved models hold bit-identical tensors under the same names."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def straight_killed_resumed(model: torch.nn.Module, tmp_path: Path, args: list[str], env: dict,
                            timeout: float = 120) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Save `model` and compress it with `uvc compress ... args` twice: straight through, and killed after
    its first checkpoint, then resumed. Asserts that both save bit-identical weights; returns
    (straight output folder, resumed output folder, the resume's completed process)."""
    model_dir = tmp_path / "tiny"
    uvc.save(model, model_dir)
    command = [sys.executable, "-m", "uvc", "compress", "--model", str(model_dir), "--budget", "0.5", "--seed", "3",
               "--checkpoint-every", "2", *args]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run([*command, "--out", str(straight)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    kill_after_first_checkpoint([*command, "--out", str(killed)], killed, env, timeout=timeout)
    resumed = subprocess.run([*command, "--out", str(killed), "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(straight, killed)
    return straight, killed, resumed


@pytest.fixture(scope="session")
def fmnist_available() -> bool:
    from uvc.data import fashion_mnist_dir
    from uvc.errors import UVCError

    try:
        fashion_mnist_dir()
        return True
    except UVCError:
        return False


def random_plan(model: torch.nn.Module, generator: torch.Generator, skip_prob: float = 0.15):
    """A random but valid plan (one head width per layer), for testing the FLOPs model and slimming."""
    from uvc.adapters import adapter_for
    from uvc.plan import LayerPlan

    def pick(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    plans = []
    for block in adapter_for(model).blocks(model):
        heads, head_dim = block.attn.num_heads, block.attn.head_dim
        hidden = block.mlp.fc1.out_features
        kept_heads, width = pick(heads, randint(1, heads)), randint(1, head_dim)
        skip_block = float(torch.rand(1, generator=generator)) < skip_prob / 2
        plans.append(LayerPlan(
            heads=kept_heads, dims=[pick(head_dim, width) for _ in kept_heads], neurons=pick(hidden, randint(1, hidden)),
            attn=not skip_block and float(torch.rand(1, generator=generator)) >= skip_prob,
            mlp=not skip_block and float(torch.rand(1, generator=generator)) >= skip_prob,
        ))
    return plans


def small_vit(**kwargs) -> torch.nn.Module:
    """The default teacher's architecture (28x28, 12 blocks of DeiT-Tiny width) with random weights."""
    from uvc.models import TEACHER_ARGS
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(kwargs.pop("seed", 0))
    return VisionTransformer(**{**TEACHER_ARGS, **kwargs}).eval()


set_fused_attn(True)
assert timm.layers.use_fused_attn()
