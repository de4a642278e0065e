"""timm ViT variants beyond DeiT: each supported one is masked, slimmed, counted and saved exactly;
each unsupported one is refused, naming the feature, before any training. Checkpoints trained at one
image size load at another with the position embeddings resampled as timm does.

Every model is built from timm's registry (or timm's VisionTransformer flags) with random weights,
two blocks and small widths and images, so the whole file runs in seconds.
"""
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Attention, SwiGLU, resample_abs_pos_embed
from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock

import uvc

from conftest import fvcore_macs, random_plan

SMALL = dict(depth=2, embed_dim=64, num_heads=2)

# id: (timm name, constructor overrides, input size the checks run at)
SUPPORTED = {
    "dinov2-layerscale-patch14": ("vit_small_patch14_dinov2", dict(img_size=42), (3, 42, 42)),
    "deit3-layerscale-no-embed-class": ("deit3_small_patch16_224", dict(img_size=32), (3, 32, 32)),
    "dinov2-register-tokens": ("vit_small_patch14_reg4_dinov2", dict(img_size=42), (3, 42, 42)),
    "dynamic-img-size": ("vit_small_patch14_dinov2", dict(img_size=42, dynamic_img_size=True), (3, 56, 70)),
    "dynamic-img-pad": ("vit_base_patch16_224", dict(img_size=32, dynamic_img_size=True, dynamic_img_pad=True),
                        (3, 36, 40)),
    "gap-no-class-token": ("vit_medium_patch16_gap_256", dict(img_size=32), (3, 32, 32)),
    "avg-pool-fc-norm": ("vit_base_patch16_224", dict(img_size=32, class_token=False, global_pool="avg"), (3, 32, 32)),
    "token-fc-norm": ("vit_base_patch16_224", dict(img_size=32, fc_norm=True), (3, 32, 32)),
    "max-pool": ("vit_base_patch16_224", dict(img_size=32, global_pool="max"), (3, 32, 32)),
    "avgmax-pool-with-prefix": ("vit_base_patch16_224", dict(img_size=32, global_pool="avgmax", pool_include_prefix=True),
                                (3, 32, 32)),
    "no-pooling": ("vit_base_patch16_224", dict(img_size=32, global_pool=""), (3, 32, 32)),
    "clip-quickgelu-pre-norm": ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64), (3, 64, 64)),
    "no-qkv-bias": ("vit_base_patch16_224", dict(img_size=32, qkv_bias=False), (3, 32, 32)),
    "no-proj-bias": ("vit_base_patch16_224", dict(img_size=32, proj_bias=False), (3, 32, 32)),
    "gelu-tanh": ("vit_base_patch16_224", dict(img_size=32, act_layer="gelu_tanh"), (3, 32, 32)),
    "silu": ("vit_base_patch16_224", dict(img_size=32, act_layer="silu"), (3, 32, 32)),
    "no-pos-embed": ("vit_base_patch16_224", dict(img_size=32, pos_embed="none"), (3, 32, 32)),
    "no-final-norm-eps-1e-5": ("vit_base_patch16_224",
                               dict(img_size=32, final_norm=False, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)),
                               (3, 32, 32)),
    "patch-embed-layernorm": ("vit_base_patch16_224", dict(img_size=32, embed_norm_layer="layernorm"), (3, 32, 32)),
    "odd-mlp-ratio": ("vit_base_patch16_224", dict(img_size=32, embed_dim=56, mlp_ratio=1.09), (3, 32, 32)),
    "headless": ("vit_base_patch16_224", dict(img_size=32, num_classes=0), (3, 32, 32)),
}

# id: (timm name, constructor overrides, words the one-line refusal must contain)
REFUSED = {
    "qk-norm": ("vit_base_patch16_224", dict(img_size=32, qk_norm=True), "qk-norm"),
    "scale-attn-norm": ("vit_base_patch16_224", dict(img_size=32, scale_attn_norm=True), "attention output norm"),
    "scale-mlp-norm": ("vit_base_patch16_224", dict(img_size=32, scale_mlp_norm=True), "MLP hidden norm"),
    "swiglu": ("vit_base_patch16_224", dict(img_size=32, mlp_layer=SwiGLU), "MLP type SwiGLU"),
    "dinov2-giant-swiglu": ("vit_giant_patch14_dinov2", dict(img_size=28, embed_dim=96), "MLP type GluMlp"),
    "res-post-block": ("vit_base_patch16_224", dict(img_size=32, block_fn=ResPostBlock), "block type ResPostBlock"),
    "parallel-scaling-block": ("vit_pwee_patch16_reg1_gap_256", dict(img_size=32), "block type ParallelScalingBlock"),
    "parallel-things-block": ("vit_base_patch16_224", dict(img_size=32, block_fn=ParallelThingsBlock),
                              "block type ParallelThingsBlock"),
    "attention-pool-map": ("vit_so150m_patch16_reg4_map_256", dict(img_size=32), "attention pooling (global_pool='map')"),
    "attention-pool-prr": ("vit_base_patch16_224", dict(img_size=32, global_pool="prr"),
                           "attention pooling (global_pool='prr')"),
    "rmsnorm": ("vit_base_patch16_224", dict(img_size=32, norm_layer="rmsnorm"), "norm layer RmsNorm"),
    "patch-embed-rmsnorm": ("vit_base_patch16_224", dict(img_size=32, embed_norm_layer="rmsnorm"),
                            "patch-embedding norm RmsNorm"),
    "diff-attention": ("vit_base_patch16_224", dict(img_size=32, attn_layer="diff"), "attention type DiffAttention"),
    "hard-swish": ("vit_base_patch16_224", dict(img_size=32, act_layer="hard_swish"), "MLP activation Hardswish"),
    "rope-eva": ("vit_base_patch16_rope_224", dict(img_size=32), "Eva is not a supported Vision Transformer"),
}


def create(name, **kwargs):
    """A small random-weight model from timm's registry, with weights scaled so every part of each block matters.

    timm's own init makes LayerScale 1e-5 (DINOv2) and norms the identity, which would hide a wrong
    mask or a wrongly copied row; unit-scale random weights do not.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() >= 2 and "token" not in key and "pos_embed" not in key:
                p.normal_(0, p[0].numel() ** -0.5)  # fan-in scaled
            elif key.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() == 1:  # norm weights, LayerScale gammas
                p.uniform_(0.5, 1.5)
            else:  # class / register tokens, position embeddings
                p.normal_(0, 1.0)
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def rel_err(a, b):
    return abs(a - b) / b


@pytest.fixture(scope="module")
def built():
    """Per supported variant: dense model, its masked view under a random plan, the slimmed model, an input."""
    cache = {}

    def get(variant):
        if variant not in cache:
            name, kwargs, size = SUPPORTED[variant]
            dense = create(name, **kwargs)
            plan = random_plan(dense, torch.Generator().manual_seed(len(variant)), skip_prob=0.2)
            gated = uvc.make_compressible(create(name, **kwargs))
            uvc.set_plan(gated, plan)
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
            cache[variant] = dense, gated, uvc.slim(dense, plan), x, size
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", SUPPORTED)
def test_compressible_view_equals_the_original(variant):
    name, kwargs, size = SUPPORTED[variant]
    model = create(name, **kwargs)
    x = torch.randn(2, *size)
    reference = outputs(model, x)
    gated = uvc.make_compressible(model)
    assert (outputs(gated, x) - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", SUPPORTED)
def test_slimmed_equals_masked(variant, built):
    dense, gated, slimmed, x, _ = built(variant)
    masked = outputs(gated, x)
    assert (outputs(slimmed, x) - masked).abs().max().item() <= 1e-5
    assert (masked - outputs(dense, x)).abs().max().item() > 1e-3  # the plan really removes something
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("variant", SUPPORTED)
def test_macs_match_fvcore_dense_and_slimmed(variant, built):
    dense, gated, slimmed, _, size = built(variant)
    assert rel_err(uvc.macs(dense, size), fvcore_macs(dense, size)) < 0.005
    assert rel_err(uvc.macs(slimmed, size), fvcore_macs(slimmed, size)) < 0.005
    assert uvc.macs(gated, size) == uvc.macs(slimmed, size)


@pytest.mark.parametrize("variant", SUPPORTED)
def test_save_load_round_trip(variant, built, tmp_path):
    dense, _, slimmed, x, _ = built(variant)
    for kind, model in (("dense", dense), ("slimmed", slimmed)):
        uvc.save(model, tmp_path / kind)
        loaded = uvc.load(tmp_path / kind)
        assert type(loaded) is type(model)
        assert (outputs(loaded, x) - outputs(model, x)).abs().max().item() <= 1e-6, kind


@pytest.mark.parametrize("variant", REFUSED)
def test_unsupported_variant_is_refused_naming_the_feature(variant):
    name, kwargs, words = REFUSED[variant]
    with pytest.raises(uvc.UVCError) as refused:
        uvc.load_model(name, **{**SMALL, **kwargs})
    message = str(refused.value)
    assert words in message and "\n" not in message, message
    with pytest.raises(uvc.UVCError) as refused:
        uvc.make_compressible(timm.create_model(name, **{**SMALL, **kwargs}))
    assert str(refused.value) == message


def test_gated_attention_is_refused():
    model = create("vit_base_patch16_224", img_size=32)
    model.blocks[1].attn = Attention(64, num_heads=2, qkv_bias=True, gated=True)
    with pytest.raises(uvc.UVCError, match=r"^block 1 has an unsupported gated attention \(an output gate"):
        uvc.make_compressible(model)


# ---- checkpoints trained at another image size ---------------------------------------------------
DINO = dict(depth=2, embed_dim=64, num_heads=2)


@pytest.mark.parametrize("trained, wanted", [(70, 42), (42, 98)])
def test_checkpoint_at_another_image_size_is_resampled(tmp_path, trained, wanted):
    source = create("vit_small_patch14_dinov2", img_size=trained)
    state = source.state_dict()
    torch.save(state, tmp_path / "dinov2.pth")
    model = uvc.load_model("vit_small_patch14_dinov2", checkpoint=str(tmp_path / "dinov2.pth"), img_size=wanted, **DINO)
    grid = wanted // 14
    assert model.patch_embed.img_size == (wanted, wanted)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 64)
    expected = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's entry is not resampled
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if k != "pos_embed")
    assert outputs(model, torch.randn(2, 3, wanted, wanted)).shape == (2, 64)
    # And it is compressible at its new size.
    assert uvc.macs(model) == uvc.macs(uvc.make_compressible(model))


def test_dinov2_original_layout_loads(tmp_path):
    """facebookresearch/dinov2 checkpoints: timm's key names plus an unused mask_token."""
    source = create("vit_small_patch14_dinov2", img_size=70)
    original = {**source.state_dict(), "mask_token": torch.zeros(1, 64)}
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "dinov2_vits14.safetensors")
    path = str(tmp_path / "dinov2_vits14.safetensors")
    x = torch.randn(2, 3, 70, 70)
    same = uvc.load_model("vit_small_patch14_dinov2", checkpoint=path, img_size=70, **DINO)
    assert torch.equal(outputs(same, x), outputs(source, x))
    smaller = uvc.load_model("vit_small_patch14_dinov2", checkpoint=path, img_size=42, **DINO)
    assert smaller.pos_embed.shape == (1, 10, 64)
    assert outputs(smaller, torch.randn(1, 3, 42, 42)).shape == (1, 64)


def test_dinov2_registers_original_layout_loads(tmp_path):
    """The register release keeps a class-token position embedding and `register_tokens`; timm folds them."""
    torch.manual_seed(3)
    blocks = create("vit_small_patch14_reg4_dinov2", img_size=70).state_dict()
    cls_token, cls_pos, registers = torch.randn(1, 1, 64), torch.randn(1, 1, 64), torch.randn(1, 4, 64)
    original = {k: v for k, v in blocks.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    original.update(mask_token=torch.zeros(1, 64), cls_token=cls_token, register_tokens=registers,
                    pos_embed=torch.cat([cls_pos, blocks["pos_embed"]], dim=1))
    torch.save(original, tmp_path / "dinov2_vits14_reg4.pth")
    path = str(tmp_path / "dinov2_vits14_reg4.pth")
    model = uvc.load_model("vit_small_patch14_reg4_dinov2", checkpoint=path, img_size=70, **DINO)
    assert torch.equal(model.cls_token.detach(), cls_token + cls_pos)
    assert torch.equal(model.reg_token.detach(), registers)
    assert torch.equal(model.pos_embed.detach(), blocks["pos_embed"])
    smaller = uvc.load_model("vit_small_patch14_reg4_dinov2", checkpoint=path, img_size=42, **DINO)
    assert smaller.pos_embed.shape == (1, 9, 64)  # no_embed_class: patches only
    assert outputs(smaller, torch.randn(1, 3, 42, 42)).shape == (1, 64)
