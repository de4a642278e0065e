"""`--preset paper`: UVC as published, each of its parts a switch of its own (issue 31)."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc import cli
from uvc.compress import CompressConfig
from uvc.distill import KDConfig, distillation_loss
from uvc.engine import Schedule, make_optimizer, optimizer_step
from uvc.flops import skeleton_of
from uvc.presets import PRESETS
from uvc.search import Search, SearchConfig

from conftest import straight_killed_resumed


def tiny_gated(depth=4):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=depth, num_heads=2)
    return uvc.make_compressible(model)


def flat(cfg) -> dict:
    def walk(value, prefix):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], value
    return dict(walk(dataclasses.asdict(cfg), ""))


def test_the_paper_preset_sets_the_reference_values_and_nothing_else():
    paper, default = flat(CompressConfig.from_preset("paper")), flat(CompressConfig())
    assert {k for k in paper if paper[k] != default[k]} <= set(PRESETS["paper"])
    expected = {"search.dual": "ascent", "search.gates": "gumbel", "search.skip": "both", "search.end": "searched",
                "search.importance": "norm", "search.init": "uniform", "search.ratio_lr": 0.02, "search.z_init": 1e-3, "search.z_step_clip": 0.5,
                "search.y_lr": 1e-4, "search.gate_lr": 0.1, "search.gate_momentum": 0.9, "search.gate_weight": 5e-4,
                "search.gate_temperature": 0.5, "kd.kind": "soft", "kd.alpha": 0.1, "kd.reduction": "element",
                "search.schedule.clip_grad": 1.0, "post.clip_grad": 1.0,
                "search.schedule.lr": 2.5e-5, "post.lr": 2.5e-5}  # 1e-4 per 512 images, stated per 128
    assert {k: paper[k] for k in expected} == pytest.approx(expected)
    # uvc's defaults keep today's behaviour: none of the paper's switches is on.
    assert (default["search.dual"], default["search.gates"], default["kd.reduction"], default["search.schedule.clip_grad"],
            default["post.clip_grad"], default["search.end"], default["kd.alpha"]) == ("price", "hard", "sample", 0.0, 0.0,
                                                                                       "rewind", 0.5)
    with pytest.raises(uvc.UVCError, match="not one of paper"):
        CompressConfig.from_preset("published")


def test_explicit_options_override_the_preset_on_the_command_line():
    args = cli.build_parser("compress", "paper").parse_args(["compress", "--preset", "paper", "--kd-alpha", "0.3",
                                                             "--gates", "hard"])
    cfg = cli._config(CompressConfig.from_preset(args.preset), args)
    assert (cfg.kd.alpha, cfg.search.gates) == (0.3, "hard")  # stated explicitly
    assert (cfg.search.dual, cfg.kd.reduction, cfg.post.clip_grad) == ("ascent", "element", 1.0)  # the preset's
    assert cli._preset_in(["compress", "--preset=paper"]) == "paper" and cli._preset_in(["compress"]) is None
    with pytest.raises(SystemExit):  # an unknown preset is refused by the parser, naming the choices
        cli.main(["compress", "--preset", "published"])


def test_dual_ascent_moves_z_with_the_budget_violation_and_the_ratios_follow_the_lagrangian():
    model = tiny_gated()
    search = Search(model, 0.5, SearchConfig(dual="ascent", z_init=1e-3, z_lr=1.0, z_step_clip=0.5), skeleton_of(model))
    with torch.no_grad():
        search.ratios.zero_()  # nothing removed: R = 1 > B
    search.mark_groups()
    violation = float(search.resource()) - 0.5
    search.dual_step()
    assert float(search.z) == pytest.approx(1e-3 + min(violation, 0.5))
    before = search.ratios.detach().clone()
    d_ratio, _ = search._budget_gradients()
    gradient = search.y * search.sizes * search.next_norm + search.z * d_ratio  # dL/dratio
    search.allocation_step()
    moved = search.ratios.detach() - before
    assert torch.allclose(moved, -0.02 * gradient, atol=1e-7) and bool((moved > 0).all())  # over budget: remove more
    assert float(search.resource()) > 0.5  # a gradient step, not a projection onto the budget
    search.z.fill_(100.0)
    before = search.ratios.detach().clone()
    search.allocation_step()
    assert float((search.ratios.detach() - before).max()) == pytest.approx(0.02)  # the gradient's largest entry clipped at 1
    with torch.no_grad():
        search.ratios.copy_(0.9 * (search.sizes - 1) / search.sizes)  # almost everything removed: R < B
        search.z.fill_(0.5)
    search.mark_groups()
    violation = float(search.resource()) - 0.5
    search.dual_step()
    assert violation < 0 and float(search.z) == pytest.approx(0.5 + max(violation, -0.5))
    for _ in range(10):
        search.dual_step()
    assert float(search.z) == 0.0  # projected on z >= 0


def test_the_default_dual_sets_the_price_and_keeps_the_counts_on_the_budget():
    model = tiny_gated()
    search = Search(model, 0.5, SearchConfig(), skeleton_of(model))
    assert float(search.z) == 0.0
    search.mark_groups()
    search.allocation_step()
    search.dual_step()
    assert float(search.z) > 0 and float(search.resource()) <= 0.5


def test_gumbel_gates_are_sampled_in_training_and_hard_in_evaluation():
    model = tiny_gated(depth=6)
    search = Search(model, 0.5, SearchConfig(skip="both", gates="gumbel"), skeleton_of(model))
    with torch.no_grad():
        search.gate_margin.fill_(0.2)
        search.gate_margin[2, 0] = -3.0  # block 2 leans towards skipped
    samples = []
    for step in range(20):
        search.step_count.fill_(step)
        search.set_gates(sample=True)
        samples.append(torch.stack([torch.stack([b.attn_keep, b.mlp_keep]) for b in search._blocks]).detach())
    samples = torch.stack(samples)
    assert bool(((samples > 0) & (samples < 1)).all())  # soft samples
    assert float(samples[:, 0].std(dim=0).min()) > 0.05  # they vary from step to step
    assert float(samples[:, 2].mean()) < float(samples[:, 0].mean())  # and follow the logits
    search.step_count.fill_(3)
    search.set_gates(sample=True)
    again = torch.stack([torch.stack([b.attn_keep, b.mlp_keep]) for b in search._blocks]).detach()
    assert torch.equal(again, samples[3])  # a step draws the same gates on every rank and on a resume
    search.set_gates()  # evaluation: the hard decisions
    keeps = [(b.attn_keep, b.mlp_keep) for b in search._blocks]
    assert keeps[2] == (0.0, 0.0) and all(k == (1.0, 1.0) for i, k in enumerate(keeps) if i != 2)
    hard = Search(model, 0.5, SearchConfig(skip="both"), skeleton_of(model))  # uvc's gates never sample
    hard.set_gates(sample=True)
    assert all(isinstance(b.attn_keep, float) for b in hard._blocks)


def test_gumbel_gate_logits_step_on_the_task_gradient_and_the_budget_pull():
    model = tiny_gated()
    search = Search(model, 0.5, SearchConfig(skip="both", gates="gumbel", gate_weight=1.0), skeleton_of(model))
    search.set_gates(sample=True)
    loss = model(torch.randn(4, 1, 28, 28)).square().mean()
    loss.backward()
    task = search._gate_logits.grad.clone()
    assert float(task.abs().sum()) > 0  # the loss reaches the logits through the samples
    search.z.fill_(10.0)
    before = search.gate_margin.clone()
    search.allocation_step()
    _, d_keep = search._budget_gradients()
    keep = torch.sigmoid(before / 0.5)
    expected = before - 0.1 * (task + 10.0 * d_keep * keep * (1 - keep) / 0.5)  # first step: velocity = gradient
    assert torch.allclose(search.gate_margin, expected, atol=1e-6)


def test_gradient_clipping_bounds_the_weights_gradient_norm():
    def grad_norm_after(clip):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        optimizer, scheduler = make_optimizer(model, Schedule(1, 1e-3), 10, 128)
        loss = 100 * model(torch.randn(8, 16)).square().mean()
        optimizer_step(loss, optimizer, scheduler, 0, "test", clip_grad=clip)
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))

    assert grad_norm_after(0.0) > 10
    assert grad_norm_after(1.0) == pytest.approx(1.0, rel=1e-5)


def test_deits_kd_reduction_divides_the_kl_by_the_classes():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(student, labels)
    per_sample = distillation_loss(student, labels, teacher, KDConfig(alpha=1.0))
    per_element = distillation_loss(student, labels, teacher, KDConfig(alpha=1.0, reduction="element"))
    assert float(per_element) == pytest.approx(float(per_sample) / 10)
    mixed = distillation_loss(student, labels, teacher, KDConfig(alpha=0.1, reduction="element"))
    assert float(mixed) == pytest.approx(0.9 * float(ce) + 0.1 * float(per_element))


def test_a_paper_preset_run_lands_in_the_window_and_reports_where_the_search_ended(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does this)")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)
    uvc.save(model, tmp_path / "tiny")
    out = tmp_path / "out"
    rc = cli.main(["compress", "--preset", "paper", "--model", str(tmp_path / "tiny"), "--out", str(out), "--device", "cpu",
                   "--train-limit", "384", "--val-limit", "128", "--test-limit", "128", "--batch-size", "64",
                   "--search-epochs", "2", "--warmup-epochs", "0.5", "--post-epochs", "0.5", "--budget", "0.5",
                   "--kd-alpha", "0.2"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.49 <= report["ratio"] <= 0.5
    last_search_r = [h["R"] for h in report["history"] if h["phase"] == "search"][-1]
    assert report["search_ratio"] == pytest.approx(last_search_r)
    assert report["search_gap"] == pytest.approx(report["search_ratio"] - 0.5)
    config = report["config"]
    assert (config["search"]["dual"], config["search"]["gates"], config["search"]["end"]) == ("ascent", "gumbel", "searched")
    assert config["kd"]["alpha"] == 0.2 and config["kd"]["reduction"] == "element"  # the explicit option won


def test_a_killed_paper_preset_run_resumes_to_the_same_model(tmp_path, fmnist_available):
    """The Gumbel draws depend on the seed and the step alone, and the gates' momentum is checkpointed."""
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does this)")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)
    args = ["--preset", "paper", "--device", "cpu", "--train-limit", "512", "--val-limit", "128", "--test-limit", "128",
            "--batch-size", "64", "--search-epochs", "3", "--warmup-epochs", "0.25", "--post-epochs", "1"]
    straight, killed, _ = straight_killed_resumed(model, tmp_path, args, dict(os.environ, UVC_PROGRESS="0", OMP_NUM_THREADS="1"))
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (straight, killed))
    assert ra["layers"] == rb["layers"] and ra["search_ratio"] == rb["search_ratio"]
