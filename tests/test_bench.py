"""The smallest piece of each benchmark part: the run plan, equal training, the frozen control, baselines
reaching their budget, post-training, timings, and the summary's statistics and verdicts."""
import copy
import dataclasses
import json
import subprocess
import sys
from itertools import islice
from operator import attrgetter
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
import uvc.budget
from uvc.compress import CompressConfig, Run, post_train
from uvc.data import DataConfig
from uvc.engine import Schedule
from uvc.search import SearchConfig

from conftest import fvcore_macs, small_vit, unfused

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import baselines
import budgets
import paper
import run as bench
import speed
import summary
import tune

INPUT = (1, 28, 28)
# Bench settings small enough for a test: 4 steps of 32 images per epoch.
TINY = dataclasses.replace(bench.QUICK, train_limit=128, val_limit=64, test_limit=64, batch_size=32, calibration_images=64)


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2).eval()


# ---- what the benchmark runs -----------------------------------------------------------------
def test_full_run_plan_seeds_the_main_methods_and_runs_each_ablation_once():
    runs = bench.planned_runs(bench.FULL)
    assert len(runs) == len(set(runs)) == 70
    assert bench.FULL.budgets == (0.3, 0.5) and bench.FULL.seeds == 5
    for budget in bench.FULL.budgets:
        for method in summary.MAIN_METHODS:
            assert sorted(s for m, b, s in runs if (m, b) == (method, budget)) == [0, 1, 2, 3, 4]
        for method in summary.ABLATIONS:
            assert [s for m, b, s in runs if (m, b) == (method, budget)] == [0]
    assert set(summary.BASELINES) <= set(summary.MAIN_METHODS) and "control" in summary.MAIN_METHODS
    seed0 = (*summary.MAIN_METHODS, *summary.ABLATIONS)
    assert runs[:len(seed0) * 2] == [(m, b, 0) for b in (0.3, 0.5) for m in seed0]


def test_resume_keeps_runs_across_a_change_of_the_seed_count_the_timings_or_another_methods_rate_and_refuses_any_other(tmp_path):
    run_dir = tmp_path / "uvc-b0.5-s0"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"")
    settings = dataclasses.asdict(bench.FULL)
    earlier = {"format": summary.RESULTS_FORMAT, "teacher": "bundled", "settings": {**settings, "seeds": 3},
               "accuracy": [{"method": "uvc", "budget": 0.5, "seed": 0, "out": str(run_dir), "top1": 90.0},
                            {"method": "uvc", "budget": 0.3, "seed": 0, "out": str(tmp_path / "gone"), "top1": 89.0},
                            {"method": "control", "budget": 0.3, "seed": 0, "out": str(tmp_path / "gone"), "top1": 88.0}]}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    now = {"teacher": "bundled", "settings": settings}
    # A record stands without its model, except UVC's of seed 0, which the speed timings load
    assert list(bench.previous_runs(now, tmp_path)) == [("uvc", 0.5, 0), ("control", 0.3, 0)]
    timed_longer = {**now, "settings": {**settings, "speed_rounds": 9, "deit_batches": (1,), "cost_steps": 3}}
    assert list(bench.previous_runs(timed_longer, tmp_path)) == [("uvc", 0.5, 0), ("control", 0.3, 0)]
    # A changed post-training rate drops only the runs of the method whose rate changed
    rival_faster = {**now, "settings": {**settings, "post_lrs": {**settings["post_lrs"], "uniform": 0.1}}}
    assert list(bench.previous_runs(rival_faster, tmp_path)) == [("uvc", 0.5, 0), ("control", 0.3, 0)]
    uvc_faster = {**now, "settings": {**settings, "post_lrs": {**settings["post_lrs"], "uvc": 0.1}}}
    assert list(bench.previous_runs(uvc_faster, tmp_path)) == [("control", 0.3, 0)]
    longer = {**now, "settings": {**settings, "post_epochs": settings["post_epochs"] + 1}}
    with pytest.raises(SystemExit, match="differs from this invocation in post_epochs, so its runs cannot be reused"):
        bench.previous_runs(longer, tmp_path)
    with pytest.raises(SystemExit, match="in teacher"):
        bench.previous_runs({**now, "teacher": "bench/teacher"}, tmp_path)


def test_quick_settings_are_small():
    q = bench.QUICK
    assert q.budgets == (0.5,) and q.seeds == 1
    assert q.train_limit <= 2048 and q.val_limit <= 1000 and q.test_limit <= 2000
    assert q.search_epochs + q.post_epochs <= 2 and q.speed_rounds <= 2 and q.cost_steps <= 8
    assert len(bench.planned_runs(q)) == len(summary.LABELS)  # every method once: the whole pipeline is exercised
    folder, md, _ = bench.places(quick=True)
    assert md != bench.ROOT / "BENCHMARKS.md" and "runs" in folder.parts  # a pipeline check keeps the full tables


def test_pretrained_teacher_gets_its_own_settings_and_files():
    s = bench.settings_for("pretrained")
    assert s is bench.PRETRAINED and bench.settings_for("bundled") is bench.FULL
    assert bench.settings_for("pretrained", quick=True) is bench.QUICK
    assert s.budgets == (0.3, 0.5) and s.seeds >= 3 and s.train_limit <= 3000  # the few-images case
    assert s.search_epochs + s.post_epochs == bench.FULL.search_epochs + bench.FULL.post_epochs
    # the methods, every seed and budget, and nothing else, so that it fits its 2 hours
    runs = bench.planned_runs(s)
    assert {m for m, _, _ in runs} == {"uvc", "control", "oneshot", "uniform", "tp_magnitude", "oneshot_only"}
    assert len(runs) == 32 and [(b, seed) for m, b, seed in runs if m == "oneshot_only"] == [(0.3, 0), (0.5, 0)]
    assert bench.training_epochs(s, "oneshot_only") == (0.0, 0.0)  # --one-shot without training, as the issue lists it
    assert s.deit_budgets == ()
    pretrained, bundled = bench.places(quick=False, teacher="pretrained"), bench.places(quick=False)
    assert all(a != b for a, b in zip(pretrained, bundled)) and pretrained[1].name != "BENCHMARKS.md"  # never over the bundled tables or models


def test_the_pretrained_teacher_is_named_by_its_weights_so_a_rebuilt_one_is_another_teacher(tmp_path, monkeypatch):
    import pretrained

    monkeypatch.setattr(pretrained, "teacher_dir", lambda: tmp_path)  # where the digest is read
    model = tiny_vit()
    uvc.save(model, tmp_path)
    first = bench.teacher_label("pretrained")
    assert first.startswith("pretrained ") and summary.teacher_note(first) == summary.TEACHER_NOTES["pretrained"]
    with torch.no_grad():
        model.head.bias.add_(1.0)
    uvc.save(model, tmp_path)
    assert bench.teacher_label("pretrained") != first
    assert bench.teacher_label("bundled") == summary.BUNDLED_TEACHER and bench.teacher_label("bench/teacher") == "bench/teacher"


def test_paper_variants_train_equally_and_differ_from_the_preset_by_their_switch_alone(tmp_path):
    s = bench.FULL
    cfgs = {v: paper.variant_config(s, v, 0.3, 1, 3e-5, tmp_path, read_test=True) for v in ("uvc", *paper.SWITCHES)}
    default, preset = cfgs["uvc"], cfgs["paper"]
    assert (preset.search.dual, preset.search.gates, preset.search.end, preset.kd.alpha) == ("ascent", "gumbel", "searched", 0.1)
    assert (default.search.dual, default.search.gates, default.search.end) == ("price", "hard", "rewind")
    for variant, cfg in cfgs.items():
        assert cfg.search.schedule.epochs + cfg.post.epochs == s.search_epochs + s.post_epochs
        assert cfg.data == default.data and cfg.seed == 1 and cfg.budget == 0.3 and cfg.post.lr == 3e-5
        if variant != "uvc":
            changed = {path for path in ("search.dual", "search.gates", "search.end", "kd.alpha", "kd.reduction")
                       if attrgetter(path)(cfg) != attrgetter(path)(preset)}
            assert changed == set(paper.SWITCHES[variant])
    assert set(summary.PAPER_LABELS) == {"uvc", *paper.SWITCHES}
    assert paper.best_rate([{"post_lr": 1e-4, "top1_val": 80.0}, {"post_lr": 1e-4, "top1_val": 92.0},
                            {"post_lr": 1e-5, "top1_val": 86.0}, {"post_lr": 1e-5, "top1_val": 85.0}]) == 1e-4


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_every_method_trains_equally_long_with_the_same_data_optimizer_and_kd(tmp_path, budget):
    s = bench.FULL
    cfgs = {m: bench.compress_config(s, budget, tmp_path / m, m, seed=2) for m in summary.LABELS if m not in summary.UNTRAINED}
    for untrained in summary.UNTRAINED:  # --one-shot without training: a row of no training at all, not of less
        assert bench.compress_config(s, budget, tmp_path / untrained, untrained, seed=2).post.epochs == 0
    uvc_cfg = cfgs["uvc"]
    for method, cfg in cfgs.items():
        search = cfg.search.schedule.epochs if method in summary.SEARCHED else 0
        assert search + cfg.post.epochs == s.search_epochs + s.post_epochs == uvc_cfg.search.schedule.epochs + uvc_cfg.post.epochs
        assert (search, cfg.post.epochs) == bench.training_epochs(s, method)
        assert cfg.seed == 2 and cfg.data == uvc_cfg.data and cfg.budget == budget
        assert cfg.post.lr == s.post_lrs[method]  # each method's own rate, chosen on validation
        assert (cfg.post.weight_decay, cfg.post.warmup_epochs) == (uvc_cfg.post.weight_decay, uvc_cfg.post.warmup_epochs)
        assert cfg.kd == uvc_cfg.kd
        assert not cfg.eval_during_search and cfg.throughput_rounds == 1 and cfg.throughput_batch == 8
    one_rate = bench.at_post_lr(s, 3e-5)
    assert {bench.compress_config(one_rate, budget, tmp_path, m).post.lr for m in summary.LABELS} == {3e-5}
    for baseline in ("uniform", "tp_magnitude", "tp_taylor", "compensated", "oneshot"):
        assert cfgs[baseline].post.epochs == uvc_cfg.search.schedule.epochs + uvc_cfg.post.epochs
    assert uvc_cfg.data.train_limit == s.train_limit and uvc_cfg.data.val_limit == s.val_limit
    assert (uvc_cfg.search.frozen, uvc_cfg.search.skip, uvc_cfg.search.prune) == (False, "none", True)
    assert (uvc_cfg.search.importance, uvc_cfg.search.init) == (SearchConfig().importance, SearchConfig().init)
    control = cfgs["control"].search
    assert (control.frozen, control.skip, control.prune) == (True, "none", True)
    assert control.schedule == uvc_cfg.search.schedule and control.warmup_epochs == uvc_cfg.search.warmup_epochs
    assert cfgs["uvc_skip"].search.skip == "both" and not cfgs["uvc_skip"].search.frozen
    assert cfgs["uvc_norm"].search.importance == "norm" and cfgs["uvc_norm"].search.skip == "none"
    assert cfgs["uvc_compensated"].search.start == "compensate" and uvc_cfg.search.start == control.start == "fade"
    assert control.init == uvc_cfg.search.init and control.importance == uvc_cfg.search.importance  # the same start plan
    assert cfgs["uvc_searched"].search.end == "searched" and uvc_cfg.search.end == control.end == "rewind"


def _search_state(run: Run) -> dict:
    return {k: v.detach().clone() for k, v in run.search.state_dict().items()}


def test_the_control_trains_the_uniform_plan_and_moves_no_ratio_gate_or_dual(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    moved = {}
    for method in ("control", "uvc"):
        cfg = bench.compress_config(TINY, 0.5, tmp_path / method, method)
        cfg.search.warmup_epochs = 0  # so that UVC's ratios and duals move from the first step
        model = tiny_vit()
        run = Run(cfg, model=model, teacher=model)
        before, weights = _search_state(run), run.student.blocks[0].attn.qkv.weight.detach().clone()
        if method == "control":  # it starts at the uniform plan
            assert torch.equal(run.search.removed().detach(), uvc.budget.uniform_removal(run.skel, 0.5).to(before["ratios"]))
        for step, (x, y) in enumerate(islice(run.data.train, 3)):
            run.search_step(x, y, step)
        after = _search_state(run)
        moved[method] = {k for k in before if not torch.equal(before[k], after[k])}
        assert not torch.equal(weights, run.student.blocks[0].attn.qkv.weight)  # the weights train in both
    assert moved["control"] == set(), moved["control"]  # ratios, gate logits, y, z, step count: untouched
    assert {"y", "z", "ratios"} <= moved["uvc"]  # the same three steps move UVC's search


def test_given_teacher_scores_are_reported_and_the_teacher_is_not_evaluated(tmp_path, fmnist_available, monkeypatch):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    teacher = tiny_vit()
    monkeypatch.setattr(Run, "score_teacher", lambda self: pytest.fail("the teacher was evaluated again"))
    record = bench.run_method("uniform", 0.5, 0, teacher, TINY, tmp_path / "u", {"test": 12.5, "val": 25.0})
    assert (record["top1_teacher"], record["top1_val_teacher"]) == (12.5, 25.0)


# ---- tuning the split on validation -------------------------------------------------------------
def test_a_tuning_split_keeps_the_total_training_and_scales_the_search_to_its_length(tmp_path):
    full = bench.FULL
    for search in (0.5, 1.0, 1.5):
        cfg = tune.tuning_config(full, 0.5, 1, search, tmp_path)
        assert cfg.search.schedule.epochs + cfg.post.epochs == full.search_epochs + full.post_epochs
        assert cfg.search.schedule.epochs == search and not cfg.test_at_end and cfg.seed == 1
        scale = search / full.search_epochs
        assert cfg.search.warmup_epochs == pytest.approx(full.search_warmup_epochs * scale)
        assert cfg.search.fade_epochs == pytest.approx(SearchConfig().fade_epochs * scale)
    same = tune.tuning_config(full, 0.5, 1, full.search_epochs, tmp_path)  # the benchmark's own split is its UVC run
    same.test_at_end = True
    assert same == bench.compress_config(full, 0.5, tmp_path, "uvc", 1)
    for bad in (0.0, 2.0, 3.0):
        with pytest.raises(SystemExit, match="strictly between 0 and 2"):
            tune.split_settings(full, bad)


def test_search_changes_apply_to_uvc_alone_and_bad_ones_are_refused_before_any_work(tmp_path):
    changes = tune.parse_search_set(["y_init=0", "y_lr=0", "importance=norm"])
    assert changes == {"y_init": 0.0, "y_lr": 0.0, "importance": "norm"}
    cfg = tune.tuning_config(bench.FULL, 0.5, 0, 1.0, tmp_path, changes)
    assert (cfg.search.y_init, cfg.search.y_lr, cfg.search.importance) == (0.0, 0.0, "norm")
    assert cfg.search.fade_epochs == SearchConfig().fade_epochs  # what is not changed stays the benchmark's
    assert tune.tuning_config(bench.FULL, 0.5, 0, 1.0, tmp_path, {"fade_epochs": 0.0}).search.fade_epochs == 0.0
    assert tune.parse_search_set(["prune=false", "width_multiple=8"]) == {"prune": False, "width_multiple": 8}
    slow = tune.tuning_config(bench.FULL, 0.5, 0, 1.0, tmp_path, tune.parse_search_set(["lr=1e-5"])).search
    assert slow.schedule.lr == 1e-5 and slow.schedule.epochs == cfg.search.schedule.epochs  # the rate alone changes
    for bad, message in ((["y_lr"], "KEY=VALUE"), (["lr=-1"], "learning rate"), (["schedule=1"], "KEY=VALUE"), (["nonsense=1"], "KEY=VALUE"),
                         (["importance=random"], "importance"), (["prune=maybe"], "prune takes a value of type bool"),
                         (["width_multiple=1.5"], "width_multiple takes a value of type int")):
        with pytest.raises(SystemExit, match=message):
            tune.parse_search_set(bad)


def test_a_tuning_run_reports_validation_only(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    base = bench.at_post_lr(TINY, 3e-5)
    uvc_run = tune.tuning_run(tiny_vit(), base, "uvc", 0.5, 0, 0.5, 50.0, tmp_path / "uvc")
    assert uvc_run["search_epochs"] == 0.5 and uvc_run["search_epochs"] + uvc_run["post_epochs"] == TINY.search_epochs + TINY.post_epochs
    rival = tune.tuning_run(tiny_vit(), base, "uniform", 0.5, 0, 0.5, 50.0, tmp_path / "uniform")
    assert (rival["search_epochs"], rival["post_epochs"]) == (0.0, TINY.search_epochs + TINY.post_epochs)  # as benchmarked
    defaults = SearchConfig()  # a UVC run records every search field as it ran, so a later change of defaults reads right
    assert (uvc_run["search"]["init"], uvc_run["search"]["ratio_lr"]) == (defaults.init, defaults.ratio_lr) and rival["search"] is None
    control = tune.tuning_run(tiny_vit(), base, "control", 0.5, 0, 0.5, 50.0, tmp_path / "control", {"init": "activation"})
    assert control["search"]["frozen"] and not uvc_run["search"]["frozen"]  # the control takes UVC's changes
    assert (control["search"]["init"], control["search_set"], control["search_epochs"]) == ("activation", {"init": "activation"}, 0.5)
    for record, folder in ((uvc_run, "uvc"), (rival, "uniform")):
        assert summary.in_window(record["ratio"], 0.5) and 0 <= record["top1_val"] <= 100 and record["post_lr"] == 3e-5
        report = json.loads((tmp_path / folder / "report.json").read_text())
        assert "top1" not in record and report["top1"] is None and report["top1_val"] == record["top1_val"]


def test_the_tuning_table_judges_each_setting_against_the_benchmarks_and_each_rival_against_uvc(tmp_path):
    def runs(method, search, lr, vals, before=91.0):
        return [{"method": method, "budget": 0.5, "seed": i, "search_epochs": search, "post_epochs": 2 - search,
                 "post_lr": lr, "top1_val": v, "top1_val_before_post": before} for i, v in enumerate(vals)]
    results = {"teacher_val": 91.6, "commands": ["python bench/tune.py", "python bench/tune.py --post-lrs 3e-5"],
               "date": "2026-11-26", "machine": {"threads": 1}, "teacher": "runs/t5",
               "runs": runs("uvc", 0.5, 1e-4, [90.0, 90.1, 90.2]) + runs("uvc", 1.0, 1e-4, [90.4, 90.5, 90.6])
               + runs("uvc", 1.5, 1e-4, [90.3, 90.5, 90.9]) + runs("uvc", 1.0, 3e-5, [90.8, 90.9, 91.0])
               + runs("oneshot", 0.0, 1e-4, [90.4, 90.45, 90.5], 88.0) + runs("oneshot", 0.0, 3e-5, [90.5, 90.6, 90.7], 88.0)
               + [{**r, "search_set": {"y_init": 0.0, "y_lr": 0.0}} for r in runs("uvc", 1.0, 1e-4, [89.9, 90.0, 90.1])]}
    text = summary.tuning_table(results, 1.0, dict.fromkeys(summary.LABELS, 1e-4))
    rows = {tuple(line.split(" | ")[1:4]): line for line in text.splitlines() if line.startswith("| 0.5")}
    assert "90.10 ± 0.10" in rows["uvc", "0.5 + 1.5", "0.0001"] and rows["uvc", "0.5 + 1.5", "0.0001"].endswith("| loses | - |")
    assert rows["uvc", "1.5 + 0.5", "0.0001"].endswith("| within spread | - |")  # gap 0.067 < std 0.31
    assert rows["uvc", "1 + 1", "0.0001"].endswith("| - | - |") and text.startswith("Teacher: validation top-1 91.60%")
    assert rows["uvc (y_init=0, y_lr=0)", "1 + 1", "0.0001"].endswith("| loses | - |")  # 90.0 against 90.5, std 0.1
    assert rows["uvc", "1 + 1", "3e-05"].endswith("| beats it | - |")  # +0.4 over the benchmark's rate, std 0.1
    assert rows["oneshot", "0 + 2", "0.0001"].endswith("| - | within spread |")  # UVC 90.5 against 90.45
    assert rows["oneshot", "0 + 2", "3e-05"].endswith("| beats it | beats it |")  # UVC 90.9 against 90.6, std 0.1
    assert summary.tuning_section(tmp_path, 1.0, dict.fromkeys(summary.LABELS, 1e-4)) == []  # no sweep, no section
    (tmp_path / "tune.json").write_text(json.dumps(results))
    section = "\n".join(summary.tuning_section(tmp_path, 1.0, dict.fromkeys(summary.LABELS, 1e-4)))
    assert "runs/t5" in section and text in section and "no run read the test split" in section
    assert "`python bench/tune.py`; `python bench/tune.py --post-lrs 3e-5`" in section
    assert "lr 0.0001 changed validation top-1 by -0.61 point on average (lowered it in 9 of 9 runs)" in section
    assert "lr 3e-05 changed validation top-1 by -0.10 point" in section  # UVC's runs alone: one-shot's start is 88
    # The best rate per method at the benchmark's split, search changes and other splits left out
    assert "- uvc: B = 0.5: best 3e-05 (3e-05: 90.90, 0.0001: 90.50). The benchmark runs it at 0.0001." in section
    assert "- oneshot: B = 0.5: best 3e-05 (3e-05: 90.60, 0.0001: 90.45)." in section
    (tmp_path / "grid.json").write_text(json.dumps({**results, "runs": runs("uvc", 1.0, 1e-4, [90.0]) + runs("uvc", 1.0, 1e-3, [90.0])}))
    grid = summary.tuning_section(tmp_path, 1.0, dict.fromkeys(summary.LABELS, 1e-4), "grid", summary.GRID_HEADING)
    assert grid[0] == summary.GRID_HEADING and "- uvc: B = 0.5: best 0.0001 (0.0001: 90.00, 0.001: 90.00)." in "\n".join(grid)


# ---- baselines -------------------------------------------------------------------------------
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


def _check_baseline(method, tmp_path, budget=0.5):
    teacher = tiny_vit()
    state = copy.deepcopy(teacher.state_dict())
    cfg = bench.compress_config(TINY, budget, tmp_path, method)
    slimmed, plan = bench.prune_baseline(method, teacher, budget, cfg, TINY)
    assert budget - 0.01 <= uvc.macs(slimmed) / uvc.macs(teacher) <= budget
    assert [len(p.neurons) for p in plan] == [b.config()["hidden"] for b in slimmed.blocks]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())  # the teacher is left as it was


def test_uniform_baseline_reaches_the_budget(tmp_path):
    _check_baseline("uniform", tmp_path)


@pytest.mark.parametrize("method", ["compensated", "oneshot"])
def test_compensated_baselines_reach_the_budget(tmp_path, fmnist_available, method):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    _check_baseline(method, tmp_path)


def test_the_compensated_baseline_calibrates_on_unaugmented_images_whatever_the_seed(tmp_path, fmnist_available):
    """Like `--one-shot`: the seed changes the training that follows, not the one-shot model."""
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    teacher = tiny_vit()
    models = [bench.prune_baseline("compensated", teacher, 0.5, bench.compress_config(TINY, 0.5, tmp_path, "compensated", seed),
                                   TINY)[0] for seed in (0, 1)]
    plain = uvc.slim(teacher, bench.plan_of_slimmed(models[0]))
    weights = [dict(m.named_parameters()) for m in (*models, plain)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # and it was compensated


def test_a_control_run_and_a_baseline_run_report_what_the_tables_need(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    teacher = tiny_vit()
    scores = None
    records = []
    for method in ("control", "uniform"):
        cfg = bench.compress_config(TINY, 0.5, tmp_path / method, method, 1)
        scores = scores or Run(cfg, model=teacher, teacher=teacher).score_teacher()
        records.append(bench.run_method(method, 0.5, 1, teacher, TINY, tmp_path / method, scores))
    for record in records:
        assert record["seed"] == 1 and sum(record["epochs"]) == TINY.search_epochs + TINY.post_epochs
        assert summary.in_window(record["ratio"], 0.5)
        assert {"top1", "top1_val", "top1_val_before_post", "top1_teacher", "top1_val_teacher"} <= set(record)
        assert record["top1_teacher"] == records[0]["top1_teacher"]
        json.dumps(record)  # goes into results.json
    assert records[0]["epochs"] == [TINY.search_epochs, TINY.post_epochs] and records[1]["epochs"][0] == 0


def test_the_untrained_one_shot_row_is_one_shots_model_as_it_comes(tmp_path, fmnist_available):
    """`oneshot_only`: `--one-shot` without a training step, scored on validation and test as it comes out of the refit."""
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    teacher = tiny_vit()
    cfg = bench.compress_config(TINY, 0.5, tmp_path, "oneshot_only", 0)
    record = bench.run_method("oneshot_only", 0.5, 0, teacher, TINY, tmp_path, Run(cfg, model=teacher, teacher=teacher).score_teacher())
    assert record["epochs"] == [0.0, 0.0] and summary.in_window(record["ratio"], 0.5)
    assert record["top1_val"] == record["top1_val_before_post"] and record["kept_epoch"] == 0
    refit, _ = bench.prune_baseline("oneshot_only", teacher, 0.5, cfg, TINY)
    delivered = uvc.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(refit.state_dict().values(), delivered.state_dict().values()))


def test_post_train_reports_the_slimmed_model(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    model = tiny_vit()
    plan = uvc.budget.uniform_plan(model, 0.5)
    cfg = CompressConfig(out=str(tmp_path), budget=0.5, device="cpu", post=Schedule(1, 6e-4), throughput_batch=4, throughput_rounds=1,
                         data=DataConfig(train_limit=128, test_limit=64, batch_size=64),
                         search=SearchConfig(schedule=Schedule(1, 6e-4)))
    report = post_train(cfg, uvc.slim(model, plan), plan, model=copy.deepcopy(model), teacher=model)
    assert report["ratio"] == uvc.macs(uvc.load(tmp_path)) / uvc.macs(model) <= 0.5
    assert [l["hidden"] for l in report["layers"]] == [len(p.neurons) for p in plan]
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_step_cost_and_speed_pair_measure_positive_times(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    cfg = CompressConfig(out=str(tmp_path), device="cpu", data=DataConfig(train_limit=128, test_limit=64, batch_size=32))
    cost = speed.step_cost(cfg, tiny_vit(), steps=2, warmup=1)
    assert cost["search_s"] > 0 and cost["plain_s"] > 0 and cost["ratio"] == cost["search_s"] / cost["plain_s"]
    model = tiny_vit()
    pair = speed.speed_pair(model, uvc.slim(model, uvc.budget.uniform_plan(model, 0.5)), INPUT, 4, rounds=3, seconds=0.02, threads=1)
    assert pair["speedup"] == pair["slimmed"] / pair["dense"] > 0 and pair["threads"] == 1
    for name in ("dense", "slimmed"):
        low, high = pair[f"{name}_range"]
        assert 0 < low <= pair[name] <= high


FAULTS_OF_FREED_BLOCKS = """
import resource, sys, torch
sys.path.insert(0, "bench")
import speed

def faults():  # minor page faults while blocks of 1, 2, ..., 20 MiB are allocated, touched and freed in turn
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for mib in range(1, 21):
        torch.ones(mib << 18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
done = speed.steady_allocator()
print(default, faults(), done)
"""


def huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.skipif(huge_pages_always(), reason="with transparent huge pages always on, faults come 2 MiB at a time")
def test_the_steady_allocator_stops_the_page_faults_of_freed_activations():
    # In a child process: the setting lasts for the process, and what the test session allocated before
    # would change the default's behaviour.
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_FREED_BLOCKS], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    default, kept, done = int(out[0]), int(out[1]), " ".join(out[2:])
    assert done.startswith("glibc malloc: freed memory kept"), done
    # By default every block is larger than the last one freed, so glibc maps it afresh and each of its pages
    # faults (210 MiB in all); once freed memory is kept, the heap only grows to the largest block.
    assert default > 100 * 256 and kept < default / 3


# ---- the summary -----------------------------------------------------------------------------
def fake_run(method, budget, seed, top1, ratio=None, val=None):
    return {"method": method, "budget": budget, "seed": seed, "epochs": [1.0, 1.0] if method in summary.SEARCHED else [0.0, 2.0],
            "ratio": budget - 0.002 if ratio is None else ratio, "top1": top1, "top1_val": top1 + 1 if val is None else val,
            "top1_val_before_post": 50.0 + seed, "top1_teacher": 90.0, "top1_val_teacher": 95.0, "params": 1e6, "seconds": 10.0}


def fake_results(mode="full", accuracy=None):
    budgets = (0.3, 0.5) if mode == "full" else (0.5,)
    if accuracy is None:
        seeds = 3 if mode == "full" else 1
        accuracy = [fake_run(m, b, s, 89.8 + 0.1 * s if m == "uvc" else 85.0 + 0.1 * s)
                    for b in budgets for s in range(seeds) for m in summary.MAIN_METHODS]
        accuracy += [fake_run(m, b, 0, 86.0) for b in budgets for m in summary.ABLATIONS]
    pair = {"dense": 100.0, "slimmed": 150.0, "dense_range": [90.0, 110.0], "slimmed_range": [140.0, 160.0], "speedup": 1.5,
            "threads": 2}
    return {
        "format": summary.RESULTS_FORMAT, "mode": mode, "command": "python bench/run.py", "date": "today", "finished": "later",
        "seconds": 60, "teacher": "bundled vit_tiny_patch7_fmnist",
        "settings": {"budgets": budgets, "seeds": 3, "train_limit": 1000, "val_limit": None, "test_limit": None,
                     "batch_size": 64, "search_epochs": 1, "search_warmup_epochs": 0.2, "post_epochs": 1, "taylor_batches": 2,
                     "calibration_images": 1000, "speed_batches": [1, 64], "speed_rounds": 3},
        "machine": {"cpu": "cpu", "logical_cpus": 2, "threads": 2, "torch": "t", "timm": "t", "torch_pruning": "t",
                    "python": "3", "os": "linux", "gpu": None},
        "load_average_start": [0.5, 0.25, 0.0], "load_average_end": [2.0, 1.5, 1.0], "accuracy": accuracy,
        "speed": [{"method": "uvc", "budget": b, "seed": 0, "ratio": b - 0.002,
                   "pairs": [{"batch": batch, **pair} for batch in (1, 64)]} for b in budgets],
        "deit_small": [{"budget": 0.5, "ratio": 0.49, "width_multiple": w, "layers": [{"heads": 6, "head_dim": 32, "hidden": 768}],
                        "speed": [{"batch": 1, **pair}]} for w in (1, 8)],
        "search_cost": {"steps": 5, "batch": 64, "search_s": 0.2, "plain_s": 0.1, "ratio": 2.0},
    }


def test_mean_std_is_the_sample_std_and_beating_needs_a_gap_above_the_larger_std():
    assert summary.mean_std([88.0, 89.0, 90.0]) == (89.0, 1.0)
    assert summary.mean_std([88.0]) == (88.0, None)
    assert summary.fmt([88.0, 89.0, 90.0]) == "89.00 ± 1.00" and summary.fmt([88.0]) == "88.00 (1 seed)"
    assert summary.compare([89.0, 89.2, 89.4], [88.0, 88.1, 88.2]) == 1  # gap 1.2 > std 0.2
    assert summary.compare([88.0, 88.1, 88.2], [89.0, 89.2, 89.4]) == -1
    assert summary.compare([89.0, 89.1, 89.2], [88.0, 88.8, 89.6]) == 0  # gap 0.3 < std 0.8: no winner
    assert summary.compare([89.0], [80.0, 80.1]) is None  # one seed: no spread, nothing decided
    assert summary.in_window(0.49, 0.5) and summary.in_window(0.5, 0.5)
    assert not summary.in_window(0.489, 0.5) and not summary.in_window(0.5001, 0.5)


def test_summary_tables_show_mean_std_of_test_and_validation_and_mark_missed_budgets(tmp_path):
    accuracy = [fake_run(m, b, s, top1, val=val) for b in (0.3, 0.5) for m, s, top1, val in (
        ("uvc", 0, 88.0, 91.0), ("uvc", 1, 89.0, 91.5), ("uvc", 2, 90.0, 92.0),
        ("control", 0, 85.0, 90.0), ("control", 1, 85.0, 90.0), ("control", 2, 85.0, 90.0))]
    accuracy += [fake_run("uvc_skip", 0.5, 0, 84.0, ratio=0.42), fake_run("uniform", 0.5, 0, 84.0, ratio=0.501)]
    results = fake_results(accuracy=accuracy)
    rows = {r[0]: r for r in summary.accuracy_rows(results, 0.5)}
    uvc_row = rows[summary.LABELS["uvc"]]
    assert uvc_row[1] == 3 and uvc_row[2] == "1 + 1" and uvc_row[3] == "0.498" and uvc_row[4] == "ok"
    assert uvc_row[5] == "89.00 ± 1.00" and uvc_row[6] == "-1.00" and uvc_row[7] == "91.50 ± 0.50" and uvc_row[8] == "51.00 ± 1.00"
    assert rows[summary.LABELS["control"]][5] == "85.00 ± 0.00" and rows[summary.LABELS["control"]][9] == "UVC beats it"
    assert rows[summary.LABELS["uvc_skip"]][4].startswith("**MISSED**")  # R 0.42 below [0.49, 0.5]
    assert rows[summary.LABELS["uniform"]][4].startswith("**MISSED**")  # R 0.501 above the budget
    assert rows[summary.LABELS["uniform"]][2] == "0 + 2" and rows[summary.LABELS["uniform"]][9] == "n/a (1 seed)"
    summary.write_summary(results, tmp_path / "BENCHMARKS.md", tmp_path / "results")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "89.00 ± 1.00" in text and "91.50 ± 0.50" in text and "training-set figure" in text
    assert "test top-1 90.00%, validation top-1 95.00%" in text and "GPU rows are omitted" in text
    assert "0.50, 0.25, 0.00" in text and "2.00, 1.50, 1.00" in text and "torch threads fixed at 2" in text
    assert "100 [90, 110]" in text and "150 [140, 160]" in text  # median [min, max]
    assert text.count("x 32, 768") == 2  # DeiT-Small at width multiples 1 and 8
    assert (tmp_path / "results" / "accuracy_vs_macs.png").stat().st_size > 10_000


def test_targets_follow_the_beating_rule_and_say_when_the_search_adds_nothing(tmp_path):
    verdicts = {t[0]: t[2] for t in summary.targets(fake_results())}  # UVC ~89.9 ± 0.1 against ~85.1 ± 0.1 everywhere
    control, baselines_, teacher, speed_, step = [[v for k, v in verdicts.items() if word in k]
                                                  for word in ("the control", "every baseline", "teacher", "speedup", "search step")]
    assert control == ["met", "met"] and baselines_ == ["met", "met"]
    assert teacher == ["met"]  # 90.0 - 89.9 <= 0.3 over 3 seeds
    assert speed_ == ["**MISSED**"] and step == ["**MISSED**"]  # 0.75 x 1/R, search step 2.0 x

    # The speed target holds only if it holds at every thread count measured.
    results = fake_results()
    for r in results["speed"]:
        fast = {**r["pairs"][1], "threads": 1, "speedup": 0.9 / r["ratio"]}
        r["pairs"] = [fast, {**fast, "threads": 2}]
    speed_row = next(t for t in summary.targets(results) if "speedup" in t[0])
    assert speed_row[2] == "met" and "1 thread(s), B = 0.3: 0.90 x 1/R" in speed_row[1]
    results["speed"][0]["pairs"][1]["speedup"] = 0.8 / results["speed"][0]["ratio"]
    speed_row = next(t for t in summary.targets(results) if "speedup" in t[0])
    assert speed_row[2] == "**MISSED**" and "2 thread(s), B = 0.3: 0.80 x 1/R" in speed_row[1]

    # UVC 88.0 ± 1.0 against the control 87.5 ± 0.1: a gap of 0.5 below the larger std 1.0
    accuracy = [fake_run("uvc", 0.5, s, 87.0 + s) for s in range(3)] + [fake_run("control", 0.5, s, 87.4 + 0.1 * s) for s in range(3)]
    accuracy += [fake_run("uniform", 0.5, s, 80.0 + 0.1 * s) for s in range(3)] + [fake_run("tp_magnitude", 0.5, s, 88.9 + 0.1 * s) for s in range(3)]
    results = fake_results(accuracy=accuracy)
    verdicts = {t[0]: t[2] for t in summary.targets(results)}
    assert verdicts[next(k for k in verdicts if "the control" in k and "0.5" in k)] == "**MISSED**"
    assert verdicts[next(k for k in verdicts if "the control" in k and "0.3" in k)] == "not measured"  # not run
    assert verdicts[next(k for k in verdicts if "every baseline" in k and "0.5" in k)] == "**MISSED**"  # tp_magnitude ties
    assert verdicts[next(k for k in verdicts if "teacher" in k)] == "**MISSED**"  # 90.0 - 88.0 > 0.3
    findings = "\n".join(summary.findings(results))
    assert "the search adds nothing here" in findings
    summary.write_summary(results, tmp_path / "B.md", tmp_path / "results")
    assert "the search adds nothing here" in (tmp_path / "B.md").read_text()

    # UVC at R = 0.52 misses its budget: it cannot meet a target however accurate it is
    accuracy = [fake_run("uvc", 0.5, s, 95.0 + 0.1 * s, ratio=0.52) for s in range(3)] + \
               [fake_run(m, 0.5, s, 80.0 + 0.1 * s) for m in ("control", *summary.BASELINES) for s in range(3)]
    assert [t[2] for t in summary.targets(fake_results(accuracy=accuracy)) if "0.5" in t[0]][:2] == ["**MISSED**", "**MISSED**"]


def test_the_pretrained_teacher_is_judged_by_its_own_targets(tmp_path):
    """Issue 29: `--one-shot` without training within 1.5 points of the teacher at B = 0.5, UVC within 0.5 / 2.0
    points at B = 0.5 / 0.3, and UVC above `--one-shot` + KD by more than the spread; no 0.3-point gap."""
    accuracy = [fake_run("uvc", b, s, 89.6 + 0.1 * s - (1.5 if b == 0.3 else 0)) for b in (0.3, 0.5) for s in range(3)]
    accuracy += [fake_run("oneshot", b, s, 89.0 + 0.05 * s - (1.5 if b == 0.3 else 0)) for b in (0.3, 0.5) for s in range(3)]
    accuracy += [{**fake_run("oneshot_only", b, 0, 88.4 if b == 0.5 else 80.0), "epochs": [0.0, 0.0]} for b in (0.3, 0.5)]
    results = {**fake_results(accuracy=accuracy), "teacher": "pretrained 0123456789ab"}
    verdicts = {t[0]: t[2] for t in summary.targets(results)}
    gaps = {k: v for k, v in verdicts.items() if "of the teacher" in k}
    assert len(gaps) == 3 and not any("0.3 point" in k for k in gaps)  # the bench teacher's target is not applied
    assert gaps[next(k for k in gaps if "no training" in k)] == "**MISSED**"  # 90.0 - 88.4 > 1.5, one run is enough
    assert gaps[next(k for k in gaps if "UVC" in k and "B = 0.5" in k)] == "met"  # 90.0 - 89.7 <= 0.5 over 3 seeds
    assert gaps[next(k for k in gaps if "UVC" in k and "B = 0.3" in k)] == "met"  # 90.0 - 88.2 <= 2.0
    assert "1000 training images" in next(k for k in gaps if "UVC" in k)
    above = [v for k, v in verdicts.items() if "`--one-shot` + KD" in k]
    assert above == ["met", "met"]  # +0.6 against a larger std of 0.1
    accuracy = [r for r in accuracy if r["method"] != "oneshot"] + [fake_run("oneshot", b, s, 89.5 + 0.1 * s)
                                                                    for b in (0.3, 0.5) for s in range(3)]
    verdicts = {t[0]: t[2] for t in summary.targets({**results, "accuracy": accuracy})}
    assert [v for k, v in verdicts.items() if "`--one-shot` + KD" in k] == ["**MISSED**"] * 2  # a loss at 0.3, a tie within the spread at 0.5
    summary.write_summary(results, tmp_path / "B.md", tmp_path / "results")
    text = (tmp_path / "B.md").read_text()
    assert "| uvc --one-shot, no training | 1 | 0 + 0 |" in text and "oneshot_only 1e" not in text  # a row, no rate


def test_one_seed_decides_nothing_and_quick_mode_says_so(tmp_path):
    quick = fake_results("quick")
    verdicts = [t[2] for t in summary.targets(quick)]
    assert verdicts[:5] == ["not measured"] * 5  # B = 0.3 not run; one seed at B = 0.5: no spread, nothing decided
    summary.write_summary(quick, tmp_path / "quick.md", tmp_path / "results")
    text = (tmp_path / "quick.md").read_text()
    assert "Quick mode" in text and "(1 seed)" in text and "whether the search helps is not measured" in text


def test_an_older_results_file_is_refused(tmp_path):
    old = fake_results()
    del old["format"]
    with pytest.raises(SystemExit, match="older bench"):
        summary.write_summary(old, tmp_path / "B.md", tmp_path / "results")


def test_data_efficiency_sections_come_from_their_result_files(tmp_path):
    assert summary.data_efficiency(tmp_path) == []  # nothing measured, nothing claimed
    row = {"budget": 0.5, "importance": "activation", "allocation": "global", "compensation": "refit-stream",
           "ratio": 0.4999, "val": 91.28, "test": 89.83, "plan_time": {"wall_s": 1.4}, "compensation_time": {"wall_s": 5.0}}
    (tmp_path / "oneshot.json").write_text(json.dumps({"teacher": {"val": 91.58, "test": 90.21}, "calibration_images": 1000,
                                                        "ridge": 1e-3, "rows": [row]}))
    run = {"images": 3000, "method": "compensated", "ratio": 0.5, "top1_val_before_post": 91.0, "top1_val": 91.2,
           "top1": 89.9, "top1_teacher": 90.21, "seconds": 60}
    (tmp_path / "few_images.json").write_text(json.dumps({"command": "python bench/few_images.py", "date": "today",
                                                           "machine": {"threads": 1}, "load_average_start": [1, 1, 1],
                                                           "load_average_end": [1, 1, 1], "budget": 0.5,
                                                           "runs": [run, {**run, "top1_val_before_post": 90.8, "top1_val": 91.0,
                                                                          "top1": 89.7, "seconds": 70}]}))
    text = "\n".join(summary.data_efficiency(tmp_path))
    assert "| 0.5 | activation | global | refit-stream | 0.4999 | 91.28 | 89.83 | 6.4 |" in text
    assert "Best compensated configuration" not in text  # an older file without the choice says nothing of it
    assert "Command: `python bench/oneshot.py`. The teacher" in text
    choice = {"best_on_validation": {"importance": "activation", "allocation": "uniform", "compensation": "refit-stream"},
              "defaults": {"importance": "activation", "allocation": "global", "compensation": "refit-stream"},
              "mean_val": {"activation / uniform / refit-stream": 90.07, "activation / global / refit-stream": 89.94},
              "ridge_sweep": [{"budget": 0.5, "ridge": 1e-3, "val": 90.48}], "command": "python bench/oneshot.py --threads 1",
              "date": "2026-11-26T22:46:00+00:00", "machine": "x86_64, 2 CPUs, torch 2.14.1, 1 threads"}
    (tmp_path / "oneshot.json").write_text(json.dumps({**json.loads((tmp_path / "oneshot.json").read_text()), **choice}))
    text = "\n".join(summary.data_efficiency(tmp_path))
    assert "`python bench/oneshot.py --threads 1`, 2026-11-26T22:46:00+00:00, x86_64, 2 CPUs, torch 2.14.1, 1 threads." in text
    assert ("on validation, mean over the budgets: activation / uniform / refit-stream (90.07 %); `uvc compress --one-shot` "
            "defaults to activation / global / refit-stream (89.94 %). Ridge sweep of the best (validation top-1): "
            "B = 0.5, ridge 0.001: 90.48.") in text
    assert ("| 3000 | one-shot uniform plan + LS compensation + KD | 2 | 0.5000 | 90.90 ± 0.14 | 91.10 ± 0.14 | "
            "89.80 ± 0.14 | -0.41 | 65 |") in text  # the seeds' mean ± std, one row per (images, method)


def test_pretrained_teacher_mapping_reproduces_transformers_dinov2():
    """bench/pretrained.py's names and position-embedding resampling give a transformers DINOv2-S/14 (random
    weights) at 112 px; the wheel's ONNX file itself is checked by the script against onnxruntime."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'uvc[hf]')")
    import pretrained

    torch.manual_seed(0)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                            image_size=518, patch_size=14, layerscale_value=0.5)).eval()
    # transformers 5 renamed the attention projections; the wheel's ONNX file has the earlier names.
    earlier = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    named = {}
    for k, v in hf.state_dict().items():
        for new, old in earlier.items():
            k = k.replace(new, old)
        named["backbone." + k] = v.numpy()
    pos = named.pop("backbone.embeddings.position_embeddings")
    named["pos_cls"], named["pos_patches"] = pos[:, :1], pos[:, 1:]
    model = pretrained.build(pretrained.timm_state_dict(named), 112, num_classes=0)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), hf(pixel_values=x).last_hidden_state
    assert ours.shape == theirs.shape == (2, 65, 384)
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min() > 0.999


def test_budgets_train_a_macs_model_once_and_a_latency_model_per_batch_and_report_every_timing(tmp_path):
    s = dataclasses.replace(budgets.FULL, seeds=2, budgets=(0.5,), skips=("none", "both"), batches=(64, 1), macs_line=())
    plan = budgets.planned(s)
    assert len(plan) == 2 * 2 * (1 + 2) and len({budgets.run_name(e) for e in plan}) == len(plan)
    line = budgets.planned(dataclasses.replace(s, macs_line=(0.2,)))[len(plan):]  # after the main runs: MACs, gates off
    assert [(e["resource"], e["skip"], e["budget"], e["seed"]) for e in line] == [("macs", "none", 0.2, 0), ("macs", "none", 0.2, 1)]
    assert sum(e["resource"] == "macs" for e in plan) == 4  # one per seed and skip mode, whatever the batches
    runs = [{**e, "top1": 80.0 + e["seed"], "top1_val": 81.0, "macs_ratio": 0.5,
             "timed": {str(b): {"speedup": 1.5 + e["seed"], "predicted": 0.5} for b in s.batches}} for e in plan]
    results = {"command": "python bench/budgets.py", "date": "2026-12-06", "machine": {"cpu": "test"},
               "settings": json.loads(json.dumps(dataclasses.asdict(s))), "teacher": "bench/teacher",
               "teacher_scores": {"test": 89.0, "val": 90.0}, "load_average_start": [1.0], "runs": runs}
    results["replaced"] = [{"why": "a new start", "runs": [{**runs[0], "top1": 70.0, "top1_val": 71.0},
                                                         {**runs[0], "seed": 1, "top1": 72.0, "top1_val": 73.0}]}]
    (tmp_path / "budgets.json").write_text(json.dumps(results))
    text = "\n".join(summary.budgets_section(tmp_path / "budgets.json"))
    assert "speed-up, batch 64" in text and "speed-up, batch 1" in text and "latency at batch 1" in text
    assert "80.50 ± 0.71" in text and "2.00 ± 0.71x" in text  # mean ± std over the two seeds
    # runs run again say so, with what their earlier records gave
    assert "Run again: 2 runs (B = 0.5 in MACs, skip none), after this change: a new start" in text
    assert "validation top-1 72.00 ± 1.41, test top-1 71.00 ± 1.41" in text


def test_rewritten_tables_keep_the_sections_other_scripts_wrote(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    gpu = "<!-- bench/gpu.py -->\n## GPU\n| a | b |\n<!-- /bench/gpu.py -->"
    md.write_text("# Benchmarks\nold tables\n\n" + gpu + "\n")
    assert summary.kept_sections(md) == [gpu]
    assert summary.kept_sections(tmp_path / "absent.md") == []


def test_budget_targets_compare_with_the_macs_line_at_equal_speed_and_skip_rows_name_the_only_reachable_side():
    def runs(resource, batch, skip, budget, top1, speedup):
        return [{"resource": resource, "batch": batch, "skip": skip, "budget": budget, "seed": i, "top1": t,
                 "top1_val": t + 1.0, "timed": {str(batch): {"speedup": speedup}}} for i, t in enumerate(top1)]

    groups = {
        (0.5, "none", "macs", 64): runs("macs", 64, "none", 0.5, [89.8, 89.9], 1.6),
        (0.3, "none", "macs", 64): runs("macs", 64, "none", 0.3, [89.4, 89.6], 2.4),
        (0.5, "none", "latency", 64): runs("latency", 64, "none", 0.5, [89.0, 89.1], 2.0),  # 0.5 point under the line
        (0.5, "both", "latency", 64): runs("latency", 64, "both", 0.5, [89.6, 89.8], 1.8),  # on it, but too slow
        (0.3, "none", "latency", 64): runs("latency", 64, "none", 0.3, [88.0, 88.2], 3.3),  # faster than any MACs model
        (0.3, "none", "latency", 1): [{"resource": "latency", "batch": 1, "skip": "none", "budget": 0.3, "seed": 0,
                                       "unreachable": 0.505}],
        (0.3, "both", "latency", 1): runs("latency", 1, "both", 0.3, [87.0, 87.5], 3.1),
    }
    rows = {(r[0], r[1], r[2]): r for r in summary.budget_targets(groups)}
    assert (0.3, "none", 1) not in rows  # unreachable: nothing to judge
    assert "89.67 (between 1.60x and 2.40x)" in rows[(0.5, "none", 64)][5]
    assert rows[(0.5, "none", 64)][6] == "**MISSED** (accuracy)"
    assert rows[(0.5, "both", 64)][6] == "**MISSED** (speed)"
    assert "the fastest MACs model, 2.40x" in rows[(0.3, "none", 64)][5]  # faster than any: held to the fastest
    assert rows[(0.3, "none", 64)][6] == "**MISSED** (accuracy)"  # 88.1 against 89.5 +- 0.14
    defaults = {key: row[7] for key, row in rows.items()}  # --skip auto: gates on at batch 1 only
    assert defaults == {(0.5, "none", 64): "yes", (0.5, "both", 64): "", (0.3, "none", 64): "yes", (0.3, "both", 1): "yes"}
    skip = {(r[0], r[1]): r for r in summary.skip_rows(groups)}
    assert skip[("latency at batch 1", 0.3)][4] == "skip both (the only one that reaches B)"
    assert skip[("latency at batch 64", 0.5)][4] == "skip both"  # 90.70 vs 90.05: a gap of 0.65 > the larger std 0.14


def test_a_continued_sweep_keeps_its_runs_and_first_date_and_refuses_other_settings(tmp_path):
    path = tmp_path / "sweep.json"
    first = {"date": "2026-12-06", "settings": {"seeds": 3}, "runs": [{"seed": 0}], "replaced": [{"why": "x"}],
             "finished": "2026-12-06T10:00"}
    bench.save(first, path)
    fresh = {"date": "2026-12-07", "settings": {"seeds": 3}, "runs": []}
    assert bench.continue_sweep(tmp_path / "absent.json", fresh, ("settings",)) is fresh
    resumed = bench.continue_sweep(path, fresh, ("settings",))
    assert resumed["runs"] == [{"seed": 0}] and resumed["date"] == "2026-12-06" and resumed["resumed"] == ["2026-12-07"]
    assert resumed["replaced"] == [{"why": "x"}] and "finished" not in resumed  # history stays; the end is to come
    with pytest.raises(SystemExit, match="another settings"):
        bench.continue_sweep(path, {**fresh, "settings": {"seeds": 5}}, ("settings",))
    grown = bench.continue_sweep(path, {**fresh, "settings": {"seeds": 5}}, ("settings",), grows=("seeds",))
    assert grown["runs"] == [{"seed": 0}] and grown["settings"] == {"seeds": 5}  # more seeds only add runs


def test_a_rebuilt_table_reruns_its_latency_runs_and_repredicts_the_others_from_their_plans(tmp_path):
    from uvc.flops import skeleton_of
    from uvc.latency import TABLE_FILE, LatencyConfig, latency_model, table_for

    teacher = tiny_vit().eval()
    table_for(teacher, (1, 28, 28), torch.device("cpu"), LatencyConfig(threads=1, rounds=1, seconds=0.01), 1, tmp_path / "t")
    plan = uvc.budget.uniform_plan(teacher, 0.5)

    def entry(resource, batch, seed):
        return {"resource": resource, "batch": batch, "skip": "none", "budget": 0.5, "seed": seed,
                "timed": {"1": {"predicted": 0.9}, "64": {"predicted": 0.8}}}

    runs = [entry("macs", 64, 0), entry("macs", 64, 1), entry("latency", 64, 0), entry("latency", 1, 0)]
    kept = tmp_path / "runs" / budgets.run_name(runs[0])
    kept.mkdir(parents=True)
    (kept / "report.json").write_text(json.dumps({"plan": [p.to_dict() for p in plan]}))
    out = budgets.retabled({"runs": runs}, [1], teacher, {1: tmp_path / "t" / TABLE_FILE}, tmp_path / "runs")
    assert [budgets.run_name(r) for r in out["runs"]] == [budgets.run_name(r) for r in runs[:3]]  # batch 1's latency run goes
    table = latency_model(json.loads((tmp_path / "t" / TABLE_FILE).read_text()))
    expected = uvc.budget.plan_ratio(skeleton_of(teacher, resource="latency", latency=table), plan)
    assert out["runs"][0]["timed"]["1"]["predicted"] == expected != 0.9  # from its plan and the new table
    assert out["runs"][1]["timed"]["1"]["predicted"] is None  # its folder is gone: no prediction, not a stale one
    assert out["runs"][2]["timed"]["64"]["predicted"] == 0.8 and out["rebuilt_tables"][0]["batches"] == [1]
    assert summary.mean_of([0.5, None]) == "0.500 (1 of 2)" and summary.mean_of([None]) == "n/a"


def test_the_ridge_sweep_reports_how_far_the_refit_moved_the_weights():
    import oneshot as oneshot_bench

    slimmed = tiny_vit()
    refitted = copy.deepcopy(slimmed)
    with torch.no_grad():
        refitted.blocks[1].mlp.fc2.weight.mul_(3.0)  # a refit that tripled one layer
        refitted.blocks[0].attn.proj.weight.mul_(0.5)
        refitted.blocks[0].attn.qkv.weight.mul_(10.0)  # not a refitted layer: not counted
    assert oneshot_bench.weight_growth(slimmed, refitted) == pytest.approx(3.0, rel=1e-5)
    assert oneshot_bench.weight_growth(slimmed, copy.deepcopy(slimmed)) == pytest.approx(1.0)


def test_runs_from_before_keep_best_are_marked_stale_with_how_many_would_change():
    old = [{"top1_val_before_post": 90.5, "top1_val": 90.2}, {"top1_val_before_post": 90.0, "top1_val": 90.4}]
    note = " ".join(summary.delivered_note(old))
    assert "these 2 runs predate `keep_best`" in note and "at least 1 of them" in note and "up to 0.30 point" in note
    assert "did not record" in " ".join(summary.delivered_note([{"top1_val": 90.0}]))
    assert summary.delivered_note([{**old[0], "kept_epoch": 0.0}]) == []  # a run with keep_best is current
    assert summary.delivered_note([{"budget": 0.3, "unreachable": 0.367}]) == []  # nothing ran: nothing stale


def test_sharpness_post_trains_the_dense_model_against_itself_and_moves_it_at_random(fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    import sharpness
    from uvc.data import build_data

    model = tiny_vit().requires_grad_(False)
    x = torch.randn(8, 1, 28, 28)
    assert sharpness.random_move(model, x, 0.0)["kl"] == pytest.approx(0.0, abs=1e-7)
    assert sharpness.random_move(model, x, 0.05)["kl"] > 1e-4
    data = build_data(DataConfig(train_limit=64, val_limit=32, batch_size=32, augment=False))
    run = sharpness.self_distillation(model, data, 1e-3, 32)
    assert len(run["losses"]) == 2 and 0 <= run["top1_val"] <= 100
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_vit().parameters()))  # the teacher is not trained


def test_runs_from_before_the_activation_start_are_marked_with_both_starts_on_validation(tmp_path):
    def sweep(name, b05, b03):
        runs = [{"method": "uvc", "budget": b, "seed": i, "top1_val": v} for b, vals in ((0.5, b05), (0.3, b03))
                for i, v in enumerate(vals)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": runs}))

    assert summary.start_note(tmp_path, "2026-12-08T10:00:00+00:00") == []  # run at the current defaults
    old_only = " ".join(summary.start_note(tmp_path, "2026-11-26T22:19:57+00:00"))
    assert "uniform plan" in old_only and "before," not in old_only  # no comparison without both sweeps
    assert summary.start_note(tmp_path, "2026-12-07T04:42:19+00:00")  # the same day, before the change
    assert "in this section" in " ".join(summary.start_note(tmp_path, "2026-12-06T04:31:04+00:00", "every run in this section"))
    sweep("tune_keepbest_default", [90.7, 90.8, 90.75], [90.8, 90.5, 90.4])
    sweep("tune_keepbest_activation", [90.7, 90.75, 90.8], [90.2, 90.1, 90.0])
    note = " ".join(summary.start_note(tmp_path, "2026-11-26T22:19:57+00:00"))
    assert "B = 0.3: 90.57 ± 0.21 before, 90.10 ± 0.10 now (the old start wins)" in note
    assert "B = 0.5: 90.75 ± 0.05 before, 90.75 ± 0.05 now (within spread)" in note


def test_the_paper_section_reads_a_sweep_under_its_heading_and_marks_uvc_rows_from_before_the_new_start(tmp_path):
    def run(stage, method, gap, val, kept=True):
        return {"stage": stage, "method": method, "budget": 0.5, "seed": 0, "post_lr": 3e-5, "ratio": 0.5, "search_gap": gap,
                "top1_val_before_post": val, "top1_val": val, "top1": val - 1, "seconds": 100.0, "top1_teacher": 85.0,
                "top1_val_teacher": 85.1, **({"kept_epoch": 0} if kept else {})}

    def sweep(date):
        return {"command": "paper.py", "date": date, "finished": date, "machine": {"threads": 2}, "teacher": "pretrained",
                "load_average_start": [1.0], "settings": {"train_limit": 1000, "search_epochs": 1.0, "post_epochs": 1.0},
                "post_lr_grid": [1e-4, 3e-5], "runs": [run("tuning", "paper", -0.04, 26.2), run("headline", "uvc", -1e-6, 83.5),
                                                     run("headline", "paper", -0.0412, 26.2)]}

    path = tmp_path / "paper_pretrained.json"
    path.write_text(json.dumps(sweep("2026-12-07T12:00:04+00:00")))
    text = "\n".join(summary.paper_section(path, summary.PAPER_PRETRAINED_HEADING))
    assert text.startswith(summary.PAPER_PRETRAINED_HEADING) and "B = 0.5, lr 3e-05: 26.20" in text
    assert "| uvc's default (UVC) | 0.5 | 1 | 3e-05 | 0.5000 | +0.0000 |" in text  # a gap of -1e-6 is no "-0.0000"
    assert "| -0.0412 |" in text and "Stale" not in text
    path.write_text(json.dumps(sweep("2026-12-06T04:31:04+00:00")))
    old = "\n".join(summary.paper_section(path))
    assert old.startswith(summary.PAPER_HEADING) and "every row of uvc's default in this section" in old
    assert summary.paper_section(tmp_path / "missing.json") == []
