"""The smallest piece of each benchmark part: baselines reach their budget, post-training, timings, the summary."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
import uvc.budget
from uvc.compress import CompressConfig, post_train
from uvc.data import DataConfig
from uvc.engine import Schedule
from uvc.search import SearchConfig

from conftest import fvcore_macs, small_vit, unfused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import baselines
import speed
import summary

INPUT = (1, 28, 28)


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_uniform_plan_hits_the_budget_and_keeps_the_largest_groups(budget):
    model = small_vit()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, :5] = 0  # dims 0-4 of head 0: the least important
        model.blocks[0].mlp.fc2.weight[:, :7] = 0
    plan = uvc.budget.uniform_plan(model, budget)
    ratio = uvc.macs(uvc.slim(model, plan)) / uvc.macs(model)
    assert budget - 0.01 <= ratio <= budget
    assert not set(range(5)) & set(plan[0].dims[0]) and not set(range(7)) & set(plan[0].neurons)
    assert len({len(d) for p in plan for d in p.dims}) == 1  # the same head width everywhere


@pytest.mark.parametrize("criterion", baselines.TP_CRITERIA)
def test_torch_pruning_reaches_the_budget_and_counts_like_fvcore(criterion):
    pytest.importorskip("torch_pruning")
    model = small_vit().requires_grad_(False)  # frozen, as a teacher is after uvc.compress used it
    if criterion == "taylor":
        torch.manual_seed(1)
        model = baselines.taylor_gradients(model, [(torch.randn(16, *INPUT), torch.randint(0, 10, (16,)))], 1)
    slimmed = baselines.torch_pruning_to_budget(model, 0.5, criterion)
    dense = uvc.macs(model)
    assert 0.495 <= uvc.macs(slimmed) / dense <= 0.5
    assert abs(fvcore_macs(slimmed, INPUT) - uvc.macs(slimmed)) / uvc.macs(slimmed) < 0.005
    assert all(b.config()["dim"] == 192 for b in slimmed.blocks)  # the embedding width stays
    assert [len(p.neurons) for p in baselines.plan_of_slimmed(slimmed)] == [b.config()["hidden"] for b in slimmed.blocks]


def test_torch_pruned_model_is_slimmed_without_changing_its_function():
    pytest.importorskip("torch_pruning")
    pruned = baselines._tp_prune(small_vit(), 0.4, "magnitude", INPUT)
    x = torch.randn(3, *INPUT)
    with torch.no_grad():  # unfused timm attention keeps the original scale, as the slimmed blocks do
        assert torch.allclose(unfused(pruned)(x), uvc.slim(pruned)(x), atol=1e-5)


def test_post_train_reports_the_slimmed_model(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    model = tiny_vit()
    plan = uvc.budget.uniform_plan(model, 0.5)
    cfg = CompressConfig(out=str(tmp_path), budget=0.5, post=Schedule(1, 3e-4), throughput_batch=4, throughput_rounds=1,
                         data=DataConfig(train_limit=128, test_limit=64, batch_size=64),
                         search=SearchConfig(schedule=Schedule(1, 3e-4)))
    report = post_train(cfg, uvc.slim(model, plan), plan, model=copy.deepcopy(model), teacher=model)
    assert report["ratio"] == uvc.macs(uvc.load(tmp_path)) / uvc.macs(model) <= 0.5
    assert [l["hidden"] for l in report["layers"]] == [len(p.neurons) for p in plan]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_step_cost_and_speed_pair_measure_positive_times(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    cfg = CompressConfig(out=str(tmp_path), data=DataConfig(train_limit=128, test_limit=64, batch_size=32))
    cost = speed.step_cost(cfg, tiny_vit(), steps=2, warmup=1)
    assert cost["search_s"] > 0 and cost["plain_s"] > 0 and cost["ratio"] == cost["search_s"] / cost["plain_s"]
    model = tiny_vit()
    pair = speed.speed_pair(model, uvc.slim(model, uvc.budget.uniform_plan(model, 0.5)), INPUT, 4, rounds=1, seconds=0.05)
    assert pair["speedup"] == pair["slimmed"] / pair["dense"] > 0


def fake_results(mode="full"):
    def run(method, budget, top1):
        return {"method": method, "budget": budget, "ratio": budget - 0.002, "top1": top1, "top1_before_post": 50.0,
                "top1_teacher": 90.0, "params": 1e6, "seconds": 10.0}

    budgets = (0.3, 0.5) if mode == "full" else (0.5,)
    accuracy = [run(m, b, 89.8 if m == "uvc" else 85.0) for b in budgets for m in summary.LABELS]
    return {
        "mode": mode, "command": "python bench/run.py", "date": "today", "seconds": 60, "teacher": "bundled",
        "settings": {"budgets": budgets, "train_limit": 1000, "test_limit": None, "batch_size": 64, "search_epochs": 1,
                     "search_warmup_epochs": 0.2, "post_epochs": 1, "taylor_batches": 2, "speed_batches": [1, 64],
                     "speed_repeats": 3},
        "machine": {"cpu": "cpu", "logical_cpus": 2, "threads": 2, "torch": "t", "timm": "t", "torch_pruning": "t",
                    "python": "3", "os": "linux", "gpu": None},
        "load_average_start": [0, 0, 0], "load_average_end": [0, 0, 0], "accuracy": accuracy,
        "speed": [{"method": r["method"], "budget": r["budget"], "ratio": r["ratio"],
                   "pairs": [{"batch": b, "dense": 100.0, "slimmed": 150.0, "speedup": 1.5} for b in (1, 64)]} for r in accuracy],
        "deit_small": {"ratio": 0.5, "speed": [{"batch": 1, "dense": 10.0, "slimmed": 18.0, "speedup": 1.8}]},
        "search_cost": {"steps": 5, "batch": 64, "search_s": 0.2, "plain_s": 0.1, "ratio": 2.0},
    }


def test_summary_reports_every_target_including_misses(tmp_path):
    summary.write_summary(fake_results(), tmp_path / "BENCHMARKS.md", tmp_path / "results")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    verdicts = {t[0]: t[2] for t in summary.targets(fake_results())}
    assert list(verdicts.values()) == ["met", "met", "met", "**MISSED**", "**MISSED**"]  # speed 0.75 x 1/R, step 2.0 x
    assert all(target in text for target in verdicts) and "GPU rows are omitted" in text
    assert (tmp_path / "results" / "accuracy_vs_macs.png").stat().st_size > 10_000
    quick = fake_results("quick")
    assert summary.targets(quick)[2][2] == "not measured"  # B = 0.3 is not run in quick mode
    summary.write_summary(quick, tmp_path / "quick.md", tmp_path / "results")
    assert "Quick mode" in (tmp_path / "quick.md").read_text()
