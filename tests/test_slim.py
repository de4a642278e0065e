"""The compressible view, physical slimming and save/load, on real forward passes."""
import json

import pytest
import timm
import torch

import uvc
from uvc.gates import GatedBlock
from uvc.slim import SlimBlock

from conftest import small_vit, random_plan


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch16_224"])
def test_all_ones_masks_reproduce_the_timm_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    reference = outputs(model, x)
    gated = uvc.make_compressible(model)
    assert all(isinstance(b, GatedBlock) for b in gated.blocks)
    assert (outputs(gated, x) - reference).abs().max().item() <= 1e-6


def test_masks_change_the_output_and_state_dict_keys_stay():
    model = small_vit()
    keys = set(model.state_dict())
    x = torch.randn(4, 1, 28, 28)
    before = outputs(model, x)
    gated = uvc.make_compressible(model)
    assert set(gated.state_dict()) == keys
    gated.blocks[3].neuron_mask[:100] = 0
    assert (outputs(gated, x) - before).abs().max() > 1e-4


@pytest.mark.parametrize("seed", range(8))
def test_slimmed_equals_masked(seed):
    model = small_vit(seed=seed)
    plan = random_plan(model, torch.Generator().manual_seed(seed), skip_prob=0.2)
    x = torch.randn(8, 1, 28, 28)
    gated = uvc.make_compressible(small_vit(seed=seed))
    uvc.set_plan(gated, plan)
    slimmed = uvc.slim(model, plan)
    assert (outputs(slimmed, x) - outputs(gated, x)).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in model.parameters())
    assert [b.plan().to_dict() for b in gated.blocks] == [p.to_dict() for p in uvc.get_plan(gated)]


def test_slimmed_distilled_deit_equals_masked_and_runs_fused():
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    plan = random_plan(model, torch.Generator().manual_seed(1))
    gated = uvc.make_compressible(timm.create_model("deit_tiny_distilled_patch16_224").eval())
    gated.load_state_dict(model.state_dict())
    uvc.set_plan(gated, plan)
    slimmed = uvc.slim(model, plan)
    x = torch.randn(2, 3, 224, 224)
    assert (outputs(slimmed, x) - outputs(gated, x)).abs().max().item() <= 1e-5
    assert all(b.attn is None or b.attn.fused_attn for b in slimmed.blocks)


def test_slimmed_layer_is_a_plain_narrow_attention():
    model = small_vit()
    plan = random_plan(model, torch.Generator().manual_seed(3), skip_prob=0.0)
    plan[0].heads, plan[0].dims = [0, 2], [[1, 5, 9, 60], [0, 2, 4, 6]]
    block = uvc.slim(model, plan).blocks[0]
    assert isinstance(block, SlimBlock)
    assert (block.attn.num_heads, block.attn.head_dim) == (2, 4)
    assert block.attn.qkv.weight.shape == (3 * 8, 192) and block.attn.proj.weight.shape == (192, 8)
    assert block.mlp.fc1.out_features == len(plan[0].neurons)


def test_uneven_head_widths_are_refused():
    model = small_vit()
    plan = random_plan(model, torch.Generator().manual_seed(0), skip_prob=0.0)
    plan[0].heads, plan[0].dims = [0, 1], [[0, 1], [0, 1, 2]]
    with pytest.raises(uvc.UVCError, match="one head width per layer"):
        uvc.slim(model, plan)


def test_soft_gates_cannot_be_slimmed():
    gated = uvc.make_compressible(small_vit())
    gated.blocks[0].attn_keep = torch.tensor(0.4)
    with pytest.raises(uvc.UVCError, match="soft"):
        uvc.slim(gated)


@pytest.mark.parametrize("slimmed", [False, True])
def test_save_load_round_trip(tmp_path, slimmed):
    model = small_vit()
    if slimmed:
        model = uvc.slim(model, random_plan(model, torch.Generator().manual_seed(5), skip_prob=0.3))
    uvc.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.json", "model.safetensors"]
    loaded = uvc.load(tmp_path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert uvc.macs(loaded) == uvc.macs(model)


def test_save_load_distilled_fp16(tmp_path):
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    model = uvc.slim(model, random_plan(model, torch.Generator().manual_seed(2)))
    uvc.save(model, tmp_path, dtype=torch.float16)
    loaded = uvc.load(tmp_path)
    assert type(loaded).__name__ == "VisionTransformerDistilled"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 3, 224, 224)
    assert (outputs(loaded, x) - outputs(model, x)).abs().max() < 0.05


def test_saving_a_masked_model_is_refused(tmp_path):
    with pytest.raises(uvc.UVCError, match="uvc.slim"):
        uvc.save(uvc.make_compressible(small_vit()), tmp_path)


def test_corrupt_files_give_clear_errors(tmp_path):
    uvc.save(small_vit(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(uvc.UVCError, match="corrupt"):
        uvc.load(tmp_path)
    (tmp_path / "arch.json").write_text("{not json")
    with pytest.raises(uvc.UVCError, match="arch.json"):
        uvc.load(tmp_path)
    with pytest.raises(uvc.UVCError, match="no arch.json"):
        uvc.load(tmp_path / "nowhere")


def test_weights_of_another_architecture_are_named(tmp_path):
    small = uvc.slim(small_vit(), random_plan(small_vit(), torch.Generator().manual_seed(0), skip_prob=0.0))
    uvc.save(small, tmp_path)
    arch = json.loads((tmp_path / "arch.json").read_text())
    arch["layers"][0]["hidden"] += 1
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(uvc.UVCError, match=r"layers\[0\].hidden .*blocks.0.mlp.fc1"):
        uvc.load(tmp_path)
