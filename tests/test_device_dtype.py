"""Every tensor follows the model's device and dtype: the search state, slimming, the whole pipeline.

A second device is stood in for by `meta` and a second dtype by float64 (and bf16), so these run on
any machine; tests/test_cuda.py runs the real GPU path where one exists.
"""
import copy

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.compress import CompressConfig, Run, compress
from uvc.data import DataConfig
from uvc.engine import Schedule
from uvc.flops import skeleton_of
from uvc.search import Search, SearchConfig

from conftest import random_plan, small_vit


def tiny_vit(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=3, num_heads=2)
    return model.to(dtype)


def search_tensors(search: Search) -> dict[str, torch.Tensor]:
    tensors = dict(search.named_parameters())
    tensors.update(search.named_buffers())
    return tensors


def stepped_search(model, budget=0.5):
    """A search on `model` that has taken one whole iteration, so its optimizer holds state."""
    gated = uvc.make_compressible(model)
    search = Search(gated, budget, SearchConfig(), skeleton_of(gated))
    search.mark_groups(fade=0.5, probe=True)
    search.set_gates(fade=0.5, probe=True)
    weight = gated.blocks[0].attn.qkv.weight
    gated(torch.randn(2, 1, 28, 28, dtype=weight.dtype, device=weight.device)).sum().backward()
    search.record_importance()
    search.proximal_shrink(1e-3)
    search.allocation_step()
    search.dual_step()
    return gated, search


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_search_state_is_made_in_the_model_dtype(dtype):
    _, search = stepped_search(tiny_vit(dtype))
    floating = {k: v for k, v in search_tensors(search).items() if v.is_floating_point()}
    assert floating and all(v.dtype == dtype for v in floating.values()), {k: v.dtype for k, v in floating.items()}
    assert abs(search.figures()["R"] - 0.5) < 0.05  # the uniform start, one ratio step on


def test_search_state_of_a_bf16_model_stays_float32_and_its_masks_follow_the_model():
    gated, search = stepped_search(tiny_vit(torch.bfloat16))
    assert search.ratios.dtype == torch.float32 and search.z.dtype == torch.float32
    assert all(b.dim_mask.dtype == torch.bfloat16 for b in gated.blocks)


def test_every_search_state_tensor_moves_with_to_device_and_dtype():
    gated, search = stepped_search(tiny_vit())
    search.to(torch.float64)
    tensors = search_tensors(search)
    assert all(v.dtype == torch.float64 for k, v in tensors.items() if v.is_floating_point() and "gate_optimizer" not in k)
    search.to("meta")
    gated.to("meta")
    moved = search_tensors(search)
    stayed = [k for k, v in moved.items() if v.device.type != "meta" and "gate_optimizer" not in k]
    assert not stayed, f"left behind by .to(): {stayed}"
    assert all(b.head_mask.device.type == "meta" for b in gated.blocks)
    # The resource model computes on the state's device: no CPU tensor enters it.
    assert search.resource().device.type == "meta"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.bfloat16, 0.1)])
def test_slim_of_a_low_and_a_high_precision_model_equals_the_masked_model_in_that_dtype(dtype, tolerance):
    model = small_vit(seed=3).to(dtype)
    plan = random_plan(model, torch.Generator().manual_seed(3), skip_prob=0.2)
    gated = uvc.make_compressible(copy.deepcopy(model))
    uvc.set_plan(gated, plan)
    slimmed = uvc.slim(model, plan)
    assert {p.dtype for p in slimmed.parameters()} == {dtype}
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        masked, cut = gated.eval()(x), slimmed(x)
    assert masked.dtype == cut.dtype == dtype
    assert (masked.double() - cut.double()).abs().max().item() <= tolerance
    if dtype == torch.float64:  # and the float64 pair agrees with float32 arithmetic to float32 precision
        assert (uvc.slim(model.float(), plan)(x.float()).double() - cut).abs().max().item() < 1e-4


def test_slim_keeps_the_device_of_the_model():
    model = small_vit(seed=1)
    plan = random_plan(model, torch.Generator().manual_seed(1))
    meta = uvc.slim(model.to("meta"), plan)
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def float64_config(out, **kwargs):
    return CompressConfig(out=str(out), budget=0.5, device="cpu", log_every=1, throughput_batch=8, throughput_rounds=1,
                          checkpoint_every=3, post=Schedule(1, 6e-4), data=DataConfig(train_limit=256, val_limit=128,
                                                                                      test_limit=128, batch_size=64),
                          search=SearchConfig(schedule=Schedule(2, 6e-4), warmup_epochs=0.5), **kwargs)


class Killed(Exception):
    pass


def test_whole_pipeline_in_float64_with_a_resume(tmp_path, monkeypatch):
    """Search, fit, slimming, post-training, save and a mid-run resume, all in float64."""
    straight = compress(float64_config(tmp_path / "straight"), model=tiny_vit(torch.float64))
    assert 0.49 <= straight["ratio"] <= 0.5
    saved = uvc.load(tmp_path / "straight")
    weights = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float64}  # trained and saved in float64
    assert uvc.macs(saved) == straight["macs"]

    # The same run, stopped right after its third checkpoint (mid-search), then resumed from it.
    checkpoints = {"n": 0}
    original = Run.checkpoint

    def checkpoint_then_die(self):
        original(self)
        for p in self.student.parameters():
            assert p.dtype == torch.float64
        checkpoints["n"] += 1
        if checkpoints["n"] == 3:
            raise Killed

    monkeypatch.setattr(Run, "checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        compress(float64_config(tmp_path / "killed"), model=tiny_vit(torch.float64))
    monkeypatch.setattr(Run, "checkpoint", original)
    resumed = compress(float64_config(tmp_path / "killed", resume=True), model=tiny_vit(torch.float64))
    again = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert resumed["layers"] == straight["layers"] and resumed["top1"] == straight["top1"]
