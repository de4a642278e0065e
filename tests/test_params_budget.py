"""A budget in parameters: the formula is exact on slimmed models, and every way of making a plan lands on it."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.budget import uniform_plan
from uvc.compress import CompressConfig, compress
from uvc.engine import Schedule
from uvc.flops import skeleton_of
from uvc.info import describe
from uvc.models import param_count
from uvc.resource import BlockParams, block_params

from conftest import random_plan, small_vit
from test_compress import require_fmnist, tiny_config  # noqa: F401 (the fixture is used by name)

VARIANTS = {  # biases, layer scale, register tokens, pooling and distillation heads change what is counted
    "teacher": lambda: small_vit(),
    "layer scale, no qkv bias, avg pool": lambda: small_vit(depth=4, init_values=1e-5, qkv_bias=False, global_pool="avg",
                                                           class_token=False, fc_norm=True),
    "registers, no biases": lambda: small_vit(depth=4, reg_tokens=2, qkv_bias=False, proj_bias=False),
    "distilled DeiT": lambda: timm.create_model("deit_tiny_distilled_patch16_224", depth=4),
    "t2t_vit_7": lambda: timm.create_model("t2t_vit_7", img_size=28, in_chans=1, num_classes=10),
}


def removal_of(skel, plan):
    """The counts and keep values a hard plan stands for, in the Skeleton's terms."""
    shapes = [p.shape(d) for p, d in zip(plan, skel.dim)]
    removed = torch.tensor([[h - s.heads, d - s.head_dim, m - s.hidden] for s, h, d, m
                            in zip(shapes, skel.heads, skel.head_dim, skel.hidden)], dtype=torch.float64)
    keep = torch.tensor([[s.runs_attn, s.runs_mlp] for s in shapes], dtype=torch.float64)
    return removed, keep[:, 0], keep[:, 1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_formula_is_exact_on_slimmed_models(variant):
    uvc.load_model("t2t_vit_7")  # registers the T2T family with timm
    model = VARIANTS[variant]().eval()
    skel = skeleton_of(model, resource="params")
    assert skel.dense_cost == param_count(model)
    for seed in range(4):
        plan = random_plan(model, torch.Generator().manual_seed(seed), skip_prob=0.3)
        assert float(skel.cost(*removal_of(skel, plan))) == param_count(uvc.slim(model, plan)), seed


def test_parameters_are_differentiable_in_counts_and_gates():
    width, keep = torch.tensor(150.0, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    layout = BlockParams(qkv_bias=1, proj_bias=1, fc1_bias=1, fc2_bias=1, attn_fixed=2 * 192, mlp_fixed=2 * 192)
    block_params(192, width, 768, layout, attn_keep=keep).backward()
    assert width.grad.item() == pytest.approx(0.7 * (3 * (192 + 1) + 192))
    assert keep.grad.item() == 3 * 150 * 193 + 150 * 192 + 192 + 2 * 192


def test_a_resource_that_does_not_exist_is_one_line():
    with pytest.raises(uvc.UVCError, match="resource 'flops' is not one of macs, params"):
        CompressConfig(resource="flops").validate()


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)


@pytest.mark.parametrize("model", [small_vit, tiny_vit])
def test_uniform_plan_lands_in_the_window_of_parameters(model):
    model = model()
    for budget in (0.3, 0.5):
        ratio = param_count(uvc.slim(model, uniform_plan(model, budget, resource="params"))) / param_count(model)
        assert budget - 0.01 <= ratio <= budget


MODES = {"prune": {}, "prune and skip both": {"skip": "both"}, "skip alone": {"prune": False, "skip": "both"},
         "uniform (the frozen control)": {"frozen": True}, "one-shot": {"one_shot": True}}


@pytest.mark.usefixtures("require_fmnist")
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_lands_in_the_window_of_parameters(tmp_path, mode):
    options = dict(MODES[mode])
    one_shot = options.pop("one_shot", False)
    cfg = tiny_config(tmp_path, 0.5, schedule=Schedule(1, 3e-4, warmup_epochs=0.05), **options)
    cfg.resource, cfg.one_shot, cfg.post = "params", one_shot, Schedule(0, 3e-4)
    cfg.calibration_images = 128
    report = compress(cfg, model=tiny_vit())
    measured = param_count(uvc.load(tmp_path)) / param_count(tiny_vit())
    assert 0.49 <= measured <= 0.5 and report["ratio"] == measured == report["params_ratio"]
    assert report["resource"] == "params" and report["macs_ratio"] == report["macs"] / report["macs_dense"]
    if mode == "prune":  # the search itself prices parameters: after its warm-up R stays near the budget
        assert all(abs(h["R"] - 0.5) <= 0.05 for h in report["history"] if h["phase"] == "search" and h["step"] > 4)
        info = describe(str(tmp_path))  # `uvc info` of the run folder gives both ratios
        assert f"{report['macs_ratio']:.4f} of its MACs, {measured:.4f} of its parameters" in info
