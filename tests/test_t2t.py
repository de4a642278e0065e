"""T2T-ViT: architecture and key layout of the authors' release, FLOPs against fvcore, slimming, save/load."""
import copy
import json

import pytest
import timm
import torch

import uvc
import uvc.gates
from uvc.adapters import adapter_for
from uvc.t2t import T2TViT

import conftest
from conftest import fvcore_macs

SMALL = dict(img_size=28, in_chans=1, num_classes=10)  # Fashion-MNIST sized: a 2x2 token grid


def randomize(model, seed=0):
    """Weights that keep activations of order 1 (not the 0.02 init), so slimming or loading errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith(".weight") else 0.1 * noise)
    return model.eval()


def small_model(name="t2t_vit_7", seed=0, **kwargs):
    return randomize(timm.create_model(name, **{**SMALL, **kwargs}), seed)


def images(size, batch=3, seed=1):
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def random_plan(model, seed):
    """uvc's random plan with one whole block skipped on top, so slimming must drop a block."""
    plan = conftest.random_plan(model, torch.Generator().manual_seed(seed), skip_prob=0.25)
    plan[seed % len(plan)].attn = plan[seed % len(plan)].mlp = False
    return plan


def authors_keys(tokens_type, depth):
    """The state-dict keys of yitu-opensource/T2T-ViT's T2T_ViT, written out from their modules."""
    if tokens_type == "performer":
        layer = ["w", "kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias",
                 "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    else:
        layer = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                 "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    return ({"cls_token", "pos_embed", "tokens_to_token.project.weight", "tokens_to_token.project.bias",
             "norm.weight", "norm.bias", "head.weight", "head.bias"}
            | {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in layer}
            | {f"blocks.{i}.{k}" for i in range(depth) for k in block})


@pytest.mark.parametrize("name, tokens_type, depth", [("t2t_vit_7", "performer", 7), ("t2t_vit_t_14", "transformer", 14)])
def test_key_layout_and_shapes_match_the_authors_release(name, tokens_type, depth):
    state = timm.create_model(name).state_dict()
    assert set(state) == authors_keys(tokens_type, depth)
    dim, hidden = (256, 512) if name == "t2t_vit_7" else (384, 1152)
    first = "attn.qkv" if tokens_type == "transformer" else "kqv"
    assert state[f"tokens_to_token.attention1.{first}.weight"].shape == (192, 3 * 7 * 7)
    assert state[f"tokens_to_token.attention2.{first}.weight"].shape == (192, 64 * 3 * 3)
    assert state["tokens_to_token.project.weight"].shape == (dim, 576)
    assert state["pos_embed"].shape == (1, 14 * 14 + 1, dim)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    assert state["blocks.0.mlp.fc1.weight"].shape == (hidden, dim)
    if tokens_type == "performer":
        assert state["tokens_to_token.attention1.w"].shape == (32, 64)


@pytest.mark.parametrize("size, grid", [(28, (2, 2)), (32, (2, 2)), (48, (3, 3)), (224, (14, 14))])
def test_token_grid_follows_the_unfold_arithmetic(size, grid):
    model = timm.create_model("t2t_vit_7", img_size=size, in_chans=1, num_classes=10, depth=1).eval()
    assert model.tokens_to_token.grids(size, size)[-1] == grid
    assert adapter_for(model).tokens(model, (1, size, size)) == grid[0] * grid[1] + 1
    with torch.no_grad():
        assert model.forward_features(images((1, size, size), batch=2)).shape == (2, grid[0] * grid[1] + 1, 256)


def test_positions_are_the_fixed_sinusoid_table():
    model = timm.create_model("t2t_vit_7", **SMALL)
    table = model.pos_embed[0]
    assert not any(p is model.pos_embed for p in model.parameters())
    assert torch.allclose(table[0, 0::2], torch.zeros(128)) and torch.allclose(table[0, 1::2], torch.ones(128))
    assert torch.isclose(table[3, 2], torch.sin(torch.tensor(3.0) / 10000 ** (2 / 256)))
    assert torch.isclose(table[3, 3], torch.cos(torch.tensor(3.0) / 10000 ** (2 / 256)))


@pytest.mark.parametrize("name, size", [("t2t_vit_14", (3, 224, 224)), ("t2t_vit_7", (3, 224, 224)),
                                        ("t2t_vit_t_14", (3, 64, 64))])
def test_dense_macs_match_fvcore(name, size):
    model = timm.create_model(name, img_size=size[1:], in_chans=size[0])
    counted = fvcore_macs(model, size)
    assert abs(uvc.macs(model) - counted) <= 0.005 * counted


def test_slimmed_macs_match_fvcore():
    dense = timm.create_model("t2t_vit_7")
    for seed in range(3):
        plan = random_plan(dense, seed)
        slimmed = uvc.slim(dense, plan)
        masked = uvc.make_compressible(copy.deepcopy(dense))
        uvc.set_plan(masked, plan)
        assert len(slimmed.blocks) < len(dense.blocks) and uvc.macs(slimmed) == uvc.macs(masked)
        counted = fvcore_macs(slimmed, (3, 224, 224))
        assert abs(uvc.macs(slimmed) - counted) <= 0.005 * counted


def test_slimmed_outputs_equal_masked_outputs():
    dense = small_model()
    x = images((1, 28, 28))
    for seed in range(3):
        plan = random_plan(dense, seed + 10)
        masked = uvc.make_compressible(copy.deepcopy(dense))
        uvc.set_plan(masked, plan)
        slimmed = uvc.slim(dense, plan)
        with torch.no_grad():
            expected, got = masked.eval()(x), slimmed(x)
        assert expected.abs().max() > 0.1  # outputs large enough for the tolerance to mean something
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fused_and_explicit_token_attention_agree():
    model = small_model("t2t_vit_t_14")
    x = images((1, 28, 28))
    with torch.no_grad():
        fused = model(x)
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_non_square_images():
    model = small_model(img_size=(28, 48))
    assert model.tokens_to_token.grids(28, 48)[-1] == (2, 3)
    with torch.no_grad():
        assert model(images((1, 28, 48))).shape == (3, 10)


@pytest.mark.parametrize("name, slimmed", [("t2t_vit_7", False), ("t2t_vit_7", True), ("t2t_vit_t_14", False)])
def test_save_load_round_trip(tmp_path, name, slimmed):
    model = small_model(name, img_size=32)
    if slimmed:
        model = uvc.slim(model, random_plan(model, 2))
    uvc.save(model, tmp_path)
    assert json.loads((tmp_path / "arch.json").read_text())["model"]["adapter"] == "t2t-vit"
    loaded = uvc.load(tmp_path)
    assert isinstance(loaded, T2TViT) and len(loaded.blocks) == len(model.blocks)
    x = images((1, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert uvc.macs(loaded) == uvc.macs(model)


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_authors_checkpoint_loads_and_reproduces_outputs(tmp_path, name):
    source = small_model(name, seed=3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert set(state) == authors_keys(source.config["tokens_type"], len(source.blocks))
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 299, "state_dict": {f"module.{k}": torch.zeros_like(v) for k, v in state.items()},
                "state_dict_ema": state}, path)
    loaded = uvc.load_model(name, checkpoint=str(path), **SMALL)
    x = images((1, 28, 28))
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_checkpoint_of_another_layout_names_the_mismatched_keys(tmp_path):
    state = timm.create_model("t2t_vit_7", **SMALL).state_dict()
    state = {k.replace("tokens_to_token.", "t2t."): v for k, v in state.items()}
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict_ema": state}, path)
    with pytest.raises(uvc.UVCError, match=r"missing keys: .*tokens_to_token\.attention1.*unexpected keys: .*t2t\.attention1"):
        uvc.load_model("t2t_vit_7", checkpoint=str(path), **SMALL)


def test_pretrained_download_is_refused_with_the_fix():
    with pytest.raises(uvc.UVCError, match="checkpoint"):
        uvc.load_model("t2t_vit_14", pretrained=True)


def test_compressing_a_small_t2t_vit_reaches_its_budget(tmp_path, fmnist_available):
    """Issue 5, point 4: the whole UVC pipeline on T2T-ViT-7 at 28x28 Fashion-MNIST."""
    from uvc.compress import CompressConfig, compress
    from uvc.data import DataConfig
    from uvc.engine import Schedule
    from uvc.search import SearchConfig

    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_7", img_size=28, in_chans=1, num_classes=10)
    cfg = CompressConfig(out=str(tmp_path), budget=0.6, device="cpu", post=Schedule(0.5, 1.2e-3), throughput_batch=8,
                         throughput_rounds=1, log_every=1, data=DataConfig(train_limit=256, test_limit=128, batch_size=32),
                         search=SearchConfig(schedule=Schedule(1, 1.2e-3), warmup_epochs=0.25))
    report = compress(cfg, model=model)
    assert 0.59 <= report["ratio"] <= 0.6
    loaded = uvc.load(tmp_path)
    assert isinstance(loaded, T2TViT) and uvc.macs(loaded) == report["macs"]
