"""The UVC search end to end on a tiny ViT and real Fashion-MNIST images: budgets, stability, resume, errors."""
import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.compress import CompressConfig, Run, _warn_if_random, compress, post_train
from uvc.models import default_teacher_dir
from uvc.data import DataConfig
from uvc.engine import LR_BATCH, Schedule, make_optimizer
from uvc.budget import plan_counts, smallest_ratio
from uvc.compensate import compensate
from uvc.oneshot import one_shot
from uvc.gates import gated_blocks, set_plan
from uvc.search import SearchConfig

from conftest import fvcore_macs, straight_killed_resumed

pytestmark = pytest.mark.usefixtures("require_fmnist")


@pytest.fixture
def require_fmnist(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does this)")


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)


def tiny_config(out, budget=0.5, **search):
    return CompressConfig(
        out=str(out), budget=budget, device="cpu", log_every=1, throughput_batch=16, throughput_rounds=1, post=Schedule(1, 6e-4),
        data=DataConfig(train_limit=512, val_limit=256, test_limit=256, batch_size=64),
        search=SearchConfig(**{"schedule": Schedule(3, 6e-4, warmup_epochs=0.05), "warmup_epochs": 0.5, **search}),
    )


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_is_delivered_and_the_search_does_not_collapse(tmp_path, budget):
    cfg = tiny_config(tmp_path, budget)
    report = compress(cfg, model=tiny_vit())
    assert budget - 0.01 <= report["ratio"] <= budget
    saved = uvc.load(tmp_path)
    assert uvc.macs(saved) == report["macs"]
    assert abs(fvcore_macs(saved, (1, 28, 28)) - report["macs"]) / report["macs"] < 0.005
    warmup = 0.5 * 8
    search = [h for h in report["history"] if h["phase"] == "search" and h["step"] > warmup]
    assert search and all(abs(h["R"] - budget) <= 0.1 for h in search)
    assert all(all(v == v for v in h.values() if isinstance(v, float)) for h in report["history"])  # no NaN
    for key in ("macs_dense", "top1_teacher", "top1", "throughput_dense", "throughput", "layers", "history"):
        assert key in report
    assert len(report["layers"]) == 4
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "report.json").read_text())["ratio"] == report["ratio"]
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_ablations_run_and_respect_their_switches(tmp_path):
    skip_only = compress(tiny_config(tmp_path / "a", 0.6, prune=False, skip="both"), model=tiny_vit())
    assert any(not (l["attn"] and l["mlp"]) for l in skip_only["layers"])
    assert all(l["heads"] in (0, 2) for l in skip_only["layers"])  # width goes only in the final fit's last fraction
    assert 0.59 <= skip_only["ratio"] <= 0.6  # the last fraction comes from width
    prune_only = compress(tiny_config(tmp_path / "b", 0.5), model=tiny_vit())  # the default: skip gates off
    assert all(l["attn"] and l["mlp"] for l in prune_only["layers"])
    with pytest.raises(uvc.UVCError, match="turn pruning or skip gates on"):
        compress(tiny_config(tmp_path / "d", 0.6, prune=False), model=tiny_vit())
    cfg = tiny_config(tmp_path / "c", 0.5)
    cfg.kd.kind = "none"
    assert 0.49 <= compress(cfg, model=tiny_vit())["ratio"] <= 0.5


def test_distilled_deit_with_hard_kd(tmp_path):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2)
    cfg = tiny_config(tmp_path, 0.5)
    cfg.kd.kind = "hard"
    report = compress(cfg, model=model)
    assert 0.49 <= report["ratio"] <= 0.5
    assert type(uvc.load(tmp_path)).__name__ == "VisionTransformerDistilled"


@pytest.mark.parametrize("budget, message", [(0.0, r"outside \(0, 1\]"), (1.5, r"outside \(0, 1\]"),
                                             (0.001, "below the smallest model")])
def test_bad_budgets_are_refused_up_front(tmp_path, budget, message):
    with pytest.raises(uvc.UVCError, match=message):
        compress(tiny_config(tmp_path / "out", budget), model=tiny_vit())
    assert not (tmp_path / "out").exists()


CLI_ENV = dict(os.environ, UVC_PROGRESS="0", OMP_NUM_THREADS="1")


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "uvc", *args], capture_output=True, text=True, env=CLI_ENV, **kwargs)


# The CPU path on every machine: GPU runs are tests/test_cuda.py's.
CLI_TINY = ["--device", "cpu", "--train-limit", "512", "--val-limit", "256", "--test-limit", "256", "--batch-size", "64", "--search-epochs", "3",
            "--warmup-epochs", "0.5", "--post-epochs", "1"]


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet18"], "not a supported Vision Transformer"),
    (["--model", "vit_tinyy_patch16_224"], "unknown model"),
    (["--model", "deit_tiny_patch16_224", "--data-root", "/nonexistent"], "apt-get install -y dataset-fashion-mnist"),
    (["--model", "deit_tiny_patch16_224", "--data", "/nonexistent/imagenet"], "neither 'fashion-mnist' nor an existing"),
    (["--budget", "2"], "outside (0, 1]"),
    (["--model", "deit_tiny_patch16_224"], "the data has 10 classes but the model predicts 1000"),
    (["--model", "deit_tiny_patch16_224", "--data", "{image_folder}", "--input-size", "32"],
     "takes 3x224x224 images but {image_folder} provides 3x32x32: leave --input-size out"),
    (["--model", "deit_tiny_patch16_224", "--data", "{empty_folder}"], "holds no images in class sub-folders"),
    (["--model", "deit_tiny_patch16_224", "--checkpoint", "{not_a_checkpoint}"], "is not a readable PyTorch checkpoint"),
    (["--search-epochs", "0"], "search epochs must be > 0"),
    (["--width-multiple", "0"], "width multiple must be >= 1"),
])
def test_cli_bad_input_names_the_fix_and_writes_nothing(tmp_path, args, message):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "empty" / split / "some_class").mkdir(parents=True)
        (tmp_path / "images" / split / "some_class").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / "some_class" / "0.png")
    (tmp_path / "notes.pth").write_text("these are not weights")
    paths = dict(empty_folder=tmp_path / "empty", not_a_checkpoint=tmp_path / "notes.pth", image_folder=tmp_path / "images")
    args, message = [a.format(**paths) for a in args], message.format(**paths)
    out = tmp_path / "out"
    result = run_cli("compress", "--out", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "weights_only" not in result.stderr  # torch's advice to unpickle arbitrary code is not ours to give
    assert len(result.stderr.strip().splitlines()) == 1  # one line, naming the fix
    assert not out.exists()


def test_cli_checkpoint_of_another_architecture(tmp_path):
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_vit().state_dict(), str(weights))
    result = run_cli("compress", "--model", "deit_tiny_patch16_224", "--checkpoint", str(weights), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "does not fit this architecture" in result.stderr
    assert "--model the checkpoint was trained with" in result.stderr


def test_cli_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model_dir = tmp_path / "tiny"
    uvc.save(tiny_vit(), model_dir)
    result = run_cli("compress", "--model", str(model_dir), "--out", str(blocker / "out"), *CLI_TINY)
    assert result.returncode == 2 and f"{blocker} is a file, not a folder" in result.stderr


def test_killed_run_resumes_to_the_same_model(tmp_path):
    straight, killed, resumed = straight_killed_resumed(tiny_vit(), tmp_path, CLI_TINY, CLI_ENV)
    assert "resumed from" in resumed.stderr
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (straight, killed))
    assert ra["layers"] == rb["layers"] and ra["top1"] == rb["top1"]


def test_one_shot_compression_meets_the_budget_without_training(tmp_path):
    """--one-shot: no search and, by default, no post-training; the slimmed, compensated model is saved."""
    model_dir = tmp_path / "tiny"
    uvc.save(tiny_vit(), model_dir)
    result = run_cli("compress", "--model", str(model_dir), "--one-shot", "--calibration-images", "128",
                     "--width-multiple", "8", "--out", str(tmp_path / "out"), *CLI_TINY[:8])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0.49 <= report["ratio"] <= 0.5 and uvc.macs(uvc.load(tmp_path / "out")) == report["macs"]
    assert report["history"] == [] and report["config"]["one_shot"] and report["config"]["post"]["epochs"] == 0
    assert report["top1_val"] == report["top1_val_after_search"]  # nothing trained after slimming
    prepared = timm.data.resolve_data_config(model=uvc.load(tmp_path / "out"))  # how its images were prepared
    assert prepared["input_size"] == (1, 28, 28) and prepared["mean"] == (0.286,) and prepared["std"] == (0.353,)
    assert all(layer["head_dim"] % 8 == 0 and layer["hidden"] % 8 == 0 for layer in report["layers"])


def test_a_timm_name_without_weights_gets_a_warning_that_says_how_to_pass_them(caplog):
    with caplog.at_level(logging.WARNING, logger="uvc"):
        for quiet in ({"model": None}, {"model": "deit_tiny_patch16_224", "pretrained": True},
                      {"model": "deit_tiny_patch16_224", "checkpoint": "deit.pth"}):
            _warn_if_random(CompressConfig(**quiet))
        assert not caplog.text
        _warn_if_random(CompressConfig(model="deit_tiny_patch16_224"))
    assert "deit_tiny_patch16_224 has random weights" in caplog.text and "--checkpoint PATH" in caplog.text


def test_the_api_one_shot_post_trains_as_the_command_line_does():
    assert CompressConfig(one_shot=True).post_training().epochs == 0
    assert CompressConfig().post_training().epochs > 0
    assert CompressConfig(one_shot=True, post=Schedule(1, 1e-5)).post_training().epochs == 1


class Unreadable:
    """A split that fails the moment anything iterates over it."""

    def __iter__(self):
        raise AssertionError("the test split was read")


def test_a_run_with_test_at_end_off_never_reads_the_test_split(tmp_path, monkeypatch):
    """What a tuning sweep relies on: with test_at_end=False no test image is drawn, for the student or
    the teacher, and the report and picture say so instead of holding a figure."""
    module = sys.modules["uvc.compress"]  # the package's `uvc.compress` is the function of that name
    real_build = module.build_data
    monkeypatch.setattr(module, "build_data", lambda *a, **k: dataclasses.replace(real_build(*a, **k), test=Unreadable()))
    cfg = tiny_config(tmp_path, 0.5, schedule=Schedule(0.5, 6e-4))
    cfg.post, cfg.test_at_end = Schedule(0.5, 6e-4), False
    report = compress(cfg, model=tiny_vit())
    assert report["top1"] is None and report["top1_teacher"] is None
    assert 0 <= report["top1_val"] <= 100 and 0.49 <= report["ratio"] <= 0.5
    assert (tmp_path / "report.png").stat().st_size > 10_000
    cfg = tiny_config(tmp_path / "b", 0.5, schedule=Schedule(0.5, 6e-4))
    with pytest.raises(AssertionError, match="the test split was read"):
        compress(cfg, model=tiny_vit())  # the default reads it (the check above can fail)


def test_a_compensated_start_cuts_the_start_plan_at_step_0_and_refits_what_reads_it(tmp_path):
    """start="compensate": no fade; before the first step the student under its start plan is the one-shot
    compensated model of that plan, which is closer to the dense model than the plain cut."""
    dense = tiny_vit()
    run = Run(tiny_config(tmp_path, 0.5, start="compensate"), model=dense)
    assert run.fade_steps == 0
    plan = run.search.current_plan()
    plain_cut = uvc.slim(dense, plan)
    expected = uvc.slim(dense, plan)
    compensate(dense, expected, plan, (x for x, _ in run.data.calibration), max_images=run.cfg.calibration_images)
    run._compensated_start()
    set_plan(run.student, plan)
    run.student.eval()
    x = next(iter(run.data.val))[0]
    torch.testing.assert_close(run.student(x), expected(x), atol=1e-4, rtol=1e-4)
    error = lambda model: float((model(x) - dense(x)).pow(2).mean())
    assert error(expected) < 0.5 * error(plain_cut)
    report = compress(tiny_config(tmp_path / "full", 0.5, start="compensate"), model=tiny_vit())
    assert 0.49 <= report["ratio"] <= 0.5


def test_activation_init_and_ranking_start_the_search_at_one_shots_plan(tmp_path):
    """init="activation": before the first step the search's counts are the widths `one_shot` chooses on the
    same calibration images, not the uniform plan's; importance="activation" ranks the groups as it does too,
    so the start plan is one-shot's, group for group. Either run lands in the budget window."""
    dense = tiny_vit()
    for importance in ("taylor", "activation"):
        run = Run(tiny_config(tmp_path / importance, 0.5, init="activation", importance=importance), model=dense)
        _, expected, _ = one_shot(dense, 0.5, (x for x, _ in run.data.calibration), calibration_images=run.cfg.calibration_images)
        uniform = plan_counts(run.skel, run.search.current_plan())[0]
        assert not torch.equal(uniform, plan_counts(run.skel, expected)[0])
        run._activation_scores()
        torch.testing.assert_close(plan_counts(run.skel, run.search.current_plan())[0], plan_counts(run.skel, expected)[0])
        assert (run.search.current_plan() == expected) == (importance == "activation")
        report = compress(tiny_config(tmp_path / f"{importance}_run", 0.5, init="activation", importance=importance),
                          model=tiny_vit())
        assert 0.49 <= report["ratio"] <= 0.5


def test_a_budget_below_what_pruning_reaches_starts_skipped_and_still_ranks(tmp_path):
    """Below pruning's floor (a budget only the skip gates reach) the default init="activation" starts at
    `skipping_plan`: its skipped halves start with their gates shut (they fade out as removed groups do) and its
    widths as the counts, so the search starts at R = B; the activation scores still rank the groups."""
    dense = tiny_vit()
    floor = smallest_ratio(Run(tiny_config(tmp_path / "a", 0.5), model=dense).skel, prune=True, skip=False)
    budget = floor - 0.005
    run = Run(tiny_config(tmp_path / "b", budget, skip="both"), model=dense)
    run._activation_scores()
    plan = run.search.current_plan()
    removed, attn, mlp = plan_counts(run.skel, plan)
    assert not bool(attn.all() and mlp.all())  # something is skipped from the first step
    assert budget - 0.01 <= float(run.search.resource()) <= budget
    assert run.search.hard_keep()[:, 1:].tolist() == torch.stack([attn, mlp], dim=1).tolist()
    assert bool(run.search.activation_ranked)
    only_blocks = Run(tiny_config(tmp_path / "c", budget, skip="block"), model=dense)
    only_blocks._activation_scores()  # with block gates alone whole blocks are skipped
    blocks = [p.attn or p.mlp for p in only_blocks.search.current_plan()]
    assert not all(blocks) and only_blocks.search.hard_keep()[:, 0].tolist() == [float(b) for b in blocks]


def test_one_shot_told_to_skip_meets_a_budget_below_what_pruning_reaches_and_skips_nothing_above_it(tmp_path):
    dense = tiny_vit()
    floor = smallest_ratio(Run(tiny_config(tmp_path / "a", 0.5), model=dense).skel, prune=True, skip=False)
    for name, budget, skips in (("below", floor - 0.005, True), ("above", 0.5, False)):
        cfg = dataclasses.replace(tiny_config(tmp_path / name, budget, skip="both"), one_shot=True, test_at_end=False)
        report = compress(cfg, model=dense)
        assert budget - 0.01 <= report["ratio"] <= budget
        plan = [uvc.LayerPlan.from_dict(p) for p in report["plan"]]
        assert (not all(p.attn and p.mlp for p in plan)) == skips, name


def test_a_rewound_end_post_trains_the_input_weights_at_the_searched_plan_refitted(tmp_path):
    """end="rewind": post-training starts from the input model's weights slimmed at the searched plan and
    compensated against it; the searched weights chose the plan and nothing else. end="searched" starts
    from the searched weights. The input model is not changed either way."""
    dense = tiny_vit()
    untouched = {k: v.clone() for k, v in dense.state_dict().items()}
    slimmed = {}
    for end in ("rewind", "searched"):
        run = Run(tiny_config(tmp_path / end, 0.5, end=end), model=dense)
        run.out.mkdir(parents=True)  # run() would create it; the phases are driven by hand here
        run._loop(run.search_steps, run.search_step, "search")
        run._finish_search()
        plan = [uvc.LayerPlan.from_dict(p) for p in run.state.plan]
        slimmed[end] = run.slimmed.eval()
        x = next(iter(run.data.val))[0]
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in untouched.items())
    expected = uvc.slim(dense, plan)
    compensate(dense, expected, plan, (x for x, _ in run.data.calibration), max_images=run.cfg.calibration_images)
    with torch.no_grad():
        torch.testing.assert_close(slimmed["rewind"](x), expected(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(slimmed["searched"](x), expected(x), atol=1e-2)  # 24 steps of training moved it
    model_dir = tmp_path / "tiny"
    uvc.save(tiny_vit(), model_dir)
    result = run_cli("compress", "--model", str(model_dir), "--end", "searched", "--out", str(tmp_path / "cli"), *CLI_TINY)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["config"]["search"]["end"] == "searched" and 0.49 <= report["ratio"] <= 0.5
    assert "rewound" not in result.stderr


def test_post_training_reads_the_data_epochs_that_follow_the_search(tmp_path):
    """UVC and a baseline that post-trains for as long as UVC searches and post-trains see the same
    batches: post-training does not replay the search's epochs."""
    def epochs_read(run):
        read, set_epoch = [], run.data.train.set_epoch

        def recording_set_epoch(epoch, skip=0):
            read.append(epoch)
            set_epoch(epoch, skip)
        run.data.train.set_epoch = recording_set_epoch
        return read
    run = Run(tiny_config(tmp_path / "uvc"), model=tiny_vit())  # 3 epochs of search, 1 of post-training
    read = epochs_read(run)
    run.run()
    assert read == [0, 1, 2, 3] and run.state.first_epoch == 3
    baseline = Run(tiny_config(tmp_path / "baseline"), model=tiny_vit())
    read = epochs_read(baseline)
    plan = baseline.search.current_plan()
    baseline.run(pruned=(uvc.slim(tiny_vit(), plan), plan))
    assert read == [0]


def test_the_learning_rate_is_stated_per_128_images_and_scales_linearly_with_the_global_batch():
    model = tiny_vit()
    for batch, expected in ((128, 3e-4), (512, 1.2e-3), (32, 7.5e-5)):
        optimizer, _ = make_optimizer(model, Schedule(1, 3e-4), steps_per_epoch=10, batch_size=batch)
        assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(expected)
    assert LR_BATCH == DataConfig().batch_size  # at the default batch the stated rate is the rate used


@pytest.mark.parametrize("frozen", [False, True])
def test_marked_groups_fade_from_one_to_zero_so_the_search_starts_from_the_dense_function(tmp_path, frozen):
    run = Run(tiny_config(tmp_path, 0.5, frozen=frozen), model=tiny_vit())
    x, y = next(iter(run.data.train))
    masks = lambda: torch.cat([m.flatten() for b in gated_blocks(run.student) for m in (b.dim_mask, b.neuron_mask)])
    run.search_step(x, y, 0)
    assert bool((masks() == 1).all())  # step 0: the uniform plan is marked, nothing is cut yet
    assert run.fade_steps == 4
    run.search_step(x, y, 2)
    assert set(masks().unique().tolist()) == {0.5, 1.0}
    run.search_step(x, y, 4)
    assert set(masks().unique().tolist()) == {0.0, 1.0}  # the fade is over: the marked groups are cut


def test_an_image_folder_val_split_is_read_once_per_model_and_reported_as_both_splits(tmp_path, monkeypatch):
    import importlib

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "folder" / split / cls / f"{i}.png")
    pipeline = importlib.import_module("uvc.compress")
    read = []
    original = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda model, loader, device, desc="eval": read.append(desc) or original(model, loader, device, desc))
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    cfg = tiny_config(tmp_path / "out")
    cfg.data = DataConfig(data=str(tmp_path / "folder"), batch_size=8, eval_batch_size=8, workers=0, mixup=0, cutmix=0, reprob=0)
    cfg.search.schedule, cfg.eval_during_search = Schedule(1, 3e-4), False
    report = compress(cfg, model=model)
    # the delivered model's validation figure is the one measured at its epoch's end (keep_best): not read again
    assert read.count("val teacher") == 1 and "val final" not in read and not any(d.startswith("test") for d in read)
    assert report["top1"] == report["top1_val"] and report["top1_teacher"] == report["top1_val_teacher"]


def test_post_training_delivers_the_best_model_on_validation_and_keep_last_the_last(tmp_path):
    """The bundled teacher post-trained at a rate that wrecks it: keep_best delivers the slimmed model before
    post-training, bit for bit; keep_best=False (--keep-last) delivers the wreck."""
    import copy

    model = uvc.load(default_teacher_dir())
    plan = uvc.budget.uniform_plan(model, 0.5)
    slimmed = uvc.slim(model, plan)
    reports = {}
    for keep_best in (True, False):
        cfg = tiny_config(tmp_path / str(keep_best))
        cfg.post, cfg.keep_best = Schedule(2, 0.05), keep_best
        reports[keep_best] = post_train(cfg, copy.deepcopy(slimmed), plan, model=copy.deepcopy(model), teacher=model)
    kept, last = reports[True], reports[False]
    post_scores = [e["top1_val"] for e in last["evals"] if e["phase"] == "post"]
    assert len(post_scores) == 2 and max(post_scores) < last["top1_val_after_search"] - 5  # post-training wrecked it
    assert last["kept_epoch"] is None and last["top1_val"] == post_scores[-1]
    assert kept["kept_epoch"] == 0 and kept["top1_val"] == kept["top1_val_after_search"]
    delivered = uvc.load(tmp_path / "True").state_dict()
    assert all(torch.equal(delivered[k], v) for k, v in slimmed.state_dict().items())
    assert kept["top1"] > last["top1"]  # the test split reads the model delivered
