"""A budget in measured latency: the table (shapes, cache, key, hostile files), its differentiable model,
every plan path landing on its ratio, and `--resource latency` end to end through the CLI."""
import dataclasses
import json

import pytest
import torch

import uvc
from uvc import latency
from uvc.budget import fit_to_budget, plan_ratio, removal_costs, uniform_plan
from uvc.cli import main
from uvc.compress import CompressConfig, Run
from uvc.data import DataConfig
from uvc.flops import skeleton_of
from uvc.importance import group_norms
from uvc.latency import LatencyConfig, latency_model, load_table, table_for, table_key
from uvc.oneshot import one_shot, one_shot_plan
from uvc.resource import HalfTimes, LatencyModel, Skeleton
from uvc.search import Search, SearchConfig
from uvc.gates import make_compressible

from test_compress import require_fmnist  # noqa: F401 (the fixture is used by name)
from test_params_budget import tiny_vit

CPU = torch.device("cpu")
QUICK = LatencyConfig(threads=1, rounds=2, seconds=0.03)  # tests only: the defaults time 5 rounds of 0.2 s


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny ViT, its table built (and cached) once, and the folder it was cached in."""
    out = tmp_path_factory.mktemp("table")
    model = tiny_vit().eval()
    return model, table_for(model, (1, 28, 28), CPU, QUICK, 8, out), out


def test_table_has_one_entry_per_block_shape_and_grids_from_one_to_full(measured):
    model, table, out = measured
    assert table["blocks"] == [0, 0, 0, 0] and len(table["shapes"]) == 1  # the four blocks share one shape
    shape = table["shapes"][0]
    assert shape["sizes"] == [64, 2, 32, 256]
    assert shape["heads"] == [1, 2] and shape["head_dims"][0] == 1 and shape["head_dims"][-1] == 32
    assert shape["hidden"][0] == 1 and shape["hidden"][-1] == 256 and len(shape["hidden"]) == 7
    attn = torch.tensor(shape["attn"])
    assert attn.shape == (2, len(shape["head_dims"])) and bool((attn > 0).all())
    assert bool((attn.diff(dim=0) >= 0).all() and (attn.diff(dim=1) >= 0).all())  # narrower never slower
    assert all(b >= a > 0 for a, b in zip(shape["mlp"], shape["mlp"][1:]))
    assert table["key"]["threads"] == 1 and table["key"]["batch"] == 8 and table["key"]["torch"] == torch.__version__
    assert json.loads((out / latency.TABLE_FILE).read_text()) == table
    # the table's sum predicts the dense model's own timing (loosely: 1 round of 0.01 s on a shared machine)
    assert 0.3 < latency.predicted_dense_seconds(table) / table["dense_measured"] < 3


def test_a_half_is_timed_as_a_chain_of_its_cuts_from_distinct_blocks_up_to_the_byte_cap(monkeypatch):
    model = tiny_vit().eval()
    blocks = list(model.blocks)
    chain, copies = latency._chain(blocks, dict(attn=False, mlp=True, hidden=100))
    assert copies == len(chain) == 4  # the tiny ViT's four blocks are far below the cap
    assert [m.mlp.fc1.weight.data_ptr() for m in chain] != [chain[0].mlp.fc1.weight.data_ptr()] * 4  # own weights
    assert all(m.mlp.fc1.out_features == 100 and m.config()["heads"] == 0 for m in chain)
    x = torch.randn(2, 17, 64)
    with torch.no_grad():  # the chain runs the cut halves one after the other
        expected = x
        for m in chain:
            expected = m(expected)
        assert torch.equal(chain(x), expected)
    monkeypatch.setattr(latency, "CHAIN_BYTES", 1)  # a cap below one half's weights: that half alone
    assert latency._chain(blocks, dict(attn=True, mlp=False, heads=1, head_dim=8))[1] == 1


def test_cached_table_is_reused_only_for_the_same_key(measured, monkeypatch):
    model, table, out = measured
    built = []
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: built.append(a) or table)
    assert table_for(model, (1, 28, 28), CPU, QUICK, 8, out) == table and not built  # same key: from the cache
    table_for(model, (1, 28, 28), CPU, QUICK, 16, out)  # another batch: measured anew
    table_for(model, (1, 28, 28), CPU, LatencyConfig(threads=2), 8, out)  # other threads
    wider = tiny_vit()
    wider.blocks[0].mlp.fc1 = torch.nn.Linear(64, 128)
    wider.blocks[0].mlp.fc2 = torch.nn.Linear(128, 64)
    table_for(wider, (1, 28, 28), CPU, QUICK, 8, out)  # other shapes
    assert len(built) == 3


def _hostile(table: dict) -> dict:
    def edited(change):
        t = json.loads(json.dumps(table))
        change(t)
        return t
    return {
        "other threads": (edited(lambda t: t["key"].update(threads=7)), "threads 7"),
        "other device": (edited(lambda t: t["key"].update(device="cuda NVIDIA H100")), "device"),
        "other model": (edited(lambda t: t["key"]["model"].update(params=1)), "the model's shapes"),
        "negative time": (edited(lambda t: t["shapes"][0]["mlp"].__setitem__(0, -1.0)), "MLP times"),
        "NaN": (edited(lambda t: t["shapes"][0]["attn"][0].__setitem__(0, float("nan"))), "attention times"),
        "grid not ascending": (edited(lambda t: t["shapes"][0]["hidden"].reverse()), "hidden grid"),
        "grid past the width": (edited(lambda t: t["shapes"][0]["head_dims"].__setitem__(-1, 999)), "head_dims grid"),
        "block without shape": (edited(lambda t: t["blocks"].__setitem__(2, 5)), "block 2"),
        "string time": (edited(lambda t: t.update(fixed="0.1")), "fixed"),
        "no key": (edited(lambda t: t.pop("key")), "no key"),
        "a list": ([1, 2], "not a uvc latency table"),
    }


def test_a_hostile_or_foreign_table_is_refused_in_one_line(measured, tmp_path):
    model, table, _ = measured
    key = table_key(model, (1, 28, 28), CPU, 8, 1)
    for name, (content, says) in _hostile(table).items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(uvc.UVCError) as e:
            load_table(path, key)
        assert says in str(e.value) and "--latency-table" in str(e.value) and "\n" not in str(e.value), name
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(uvc.UVCError, match="cannot be read as JSON"):
        load_table(tmp_path / "bytes.json", key)
    (tmp_path / "ok.json").write_text(json.dumps(table))
    assert load_table(tmp_path / "ok.json", key) == table


def test_latency_is_interpolated_and_differentiable_in_kept_counts_and_keep_values():
    half = HalfTimes(heads=(1, 2), head_dims=(1, 4, 8), attn=((1.0, 2.0, 3.0), (2.0, 4.0, 6.0)),
                     hidden=(1, 16, 32), mlp=(1.0, 3.0, 5.0))
    skel = Skeleton(tokens=5, dim=[8, 8], heads=[2, 2], head_dim=[8, 8], hidden=[32, 32], fixed=0, resource="latency",
                    latency=LatencyModel(fixed=0.5, blocks=(half, half)))
    assert skel.dense_cost == 0.5 + 2 * (6.0 + 5.0)
    removed = torch.tensor([[0.0, 2.0, 8.0], [1.0, 0.0, 31.0]], dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([1.0, 0.25], dtype=torch.float64, requires_grad=True)
    cost = skel.cost(removed, keep, torch.ones(2, dtype=torch.float64))
    # block 0: 2 heads x 6 dims -> 5.0 (between 4.0 and 6.0); 24 neurons -> 4.0; block 1: 1 x 8 -> 3.0 (x 0.25); 1 -> 1.0
    assert float(cost) == pytest.approx(0.5 + 5.0 + 4.0 + 0.25 * 3.0 + 1.0)
    cost.backward()
    # d/d(removed) = -slope of the segment below: heads (5.0 - 2.5) per head, dims (6 - 4) / 4, neurons (5 - 3) / 16;
    # block 1 at one head: the segment from one head up (3.0 -> 6.0), times its keep value 0.25
    assert removed.grad[0].tolist() == pytest.approx([-2.5, -0.5, -0.125])
    assert removed.grad[1].tolist() == pytest.approx([-0.25 * 3.0, -0.25 * 0.25, -2.0 / 15])
    assert keep.grad.tolist() == pytest.approx([5.0, 3.0])  # a skipped half saves all it costs


@pytest.mark.parametrize("budget", [0.7, 0.85])  # a tiny model's fixed costs weigh: uniform widths reach ~0.6
def test_every_plan_path_lands_in_the_window_of_the_tables_ratio(measured, budget):
    model, table, _ = measured
    lm = latency_model(table)
    skel = skeleton_of(model, resource="latency", latency=lm)
    norms = [group_norms(b) for b in model.blocks]
    ratios = {"uniform": plan_ratio(skel, uniform_plan(model, budget, resource="latency", latency=lm)),
              "one-shot": plan_ratio(skel, one_shot_plan(model, budget, norms, "global", resource="latency", latency=lm))}
    ones = torch.ones(skel.depth)
    fitted = fit_to_budget(skel, torch.zeros(skel.depth, 3), ones, ones, removal_costs(norms), budget)
    ratios["exact fit"] = float(skel.ratio(fitted, ones, ones))
    for skip in ("none", "both"):
        gated = make_compressible(tiny_vit())
        search = Search(gated, budget, SearchConfig(skip=skip), skel)
        if skip == "both":
            search.gate_margin[1, 2] = -1.0  # one MLP half skipped: the fit restores or prices it
        ratios[f"search, skip {skip}"] = plan_ratio(skel, search.final_plan())
    for path, ratio in ratios.items():
        assert budget - 0.01 <= ratio <= budget, (path, ratio)


def test_one_shot_checks_the_plan_a_fit_keeps_against_the_budget_it_was_made_for():
    """fit_measured may keep an earlier fit than its last (the one whose timing came closest): the window then
    follows that fit's budget, not the last one tried. (MACs here: the check is the same for any resource.)"""
    model = tiny_vit().eval()
    keep_first = lambda plan_at: [plan_at(0.85), plan_at(0.7)][0]  # noqa: E731
    slimmed, plan, stats = one_shot(model, 0.85, [torch.randn(16, 1, 28, 28)], fit=keep_first)
    assert 0.84 <= stats["ratio"] <= 0.85 and stats["ratio"] == pytest.approx(uvc.macs(slimmed) / uvc.macs(model))


@pytest.mark.usefixtures("require_fmnist")
def test_skip_auto_learns_skip_gates_under_a_latency_budget_at_batch_1_and_nowhere_else(tmp_path):
    def run(name, search=None, **changes):
        cfg = CompressConfig(out=str(tmp_path / name), budget=0.95, device="cpu", throughput_batch=16, calibration_images=64,
                             data=DataConfig(train_limit=128, val_limit=64, test_limit=64, batch_size=32), **changes)
        if search:
            cfg.search = dataclasses.replace(cfg.search, **search)
        return Run(cfg, model=tiny_vit())

    at_one = {"resource": "latency", "latency": dataclasses.replace(QUICK, batch=1)}
    learned = run("batch-1", **at_one)
    assert learned.cfg.search.skip == "both" and learned.settings["search.skip"] == "both"  # a resume compares it
    assert learned.search.gate_enabled.tolist() == [True, True, True]
    elsewhere = {"macs": {}, "params": {"resource": "params"}, "batch-16": {"resource": "latency", "latency": QUICK},
                 "one-shot": {**at_one, "one_shot": True}}
    for name, changes in elsewhere.items():
        plain = run(name, **changes)
        assert plain.cfg.search.skip == "none" and not plain.search.gate_enabled.any(), name
    chosen = run("halves", search={"skip": "halves"}, **at_one)  # a mode the user names is kept
    assert chosen.search.gate_enabled.tolist() == [False, True, True]


@pytest.mark.usefixtures("require_fmnist")
def test_latency_budget_end_to_end_through_the_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["compress", "--resource", "latency", "--budget", "0.7", "--out", str(out), "--device", "cpu",
            "--train-limit", "256", "--val-limit", "128", "--test-limit", "128", "--batch-size", "64",
            "--search-epochs", "1", "--post-epochs", "0", "--calibration-images", "64", "--throughput-batch", "16",
            "--timing-rounds", "2", "--latency-threads", "1", "--latency-rounds", "1", "--latency-seconds", "0.01"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    fit = report["latency_fit"]
    assert report["resource"] == "latency" and report["ratio"] == report["latency_ratio_predicted"] == fit["predicted"]
    assert fit["fitted_budget"] - 0.01 <= report["ratio"] <= fit["fitted_budget"]
    assert fit["fits"][0]["fitted_budget"] == 0.7 and 0.69 <= fit["fits"][0]["predicted"] <= 0.7
    low, high = report["latency_ratio_measured_range"]
    assert 0 < low <= report["latency_ratio_measured"] <= high and report["macs_ratio"] < 1 and report["params_ratio"] < 1
    table = json.loads((out / latency.TABLE_FILE).read_text())
    assert report["latency_table"]["threads"] == 1 and report["latency_table"]["batch"] == 16 == table["key"]["batch"]
    # a second run given the cached table measures none
    monkeypatch.setattr(latency, "measure_table", lambda *a, **k: pytest.fail("the table was measured again"))
    assert main([*args, "--overwrite", "--latency-table", str(out / latency.TABLE_FILE), "--budget", "0.8"]) == 0
    assert json.loads((out / "report.json").read_text())["latency_table"]["fixed"] == table["fixed"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "of its measured latency" in capsys.readouterr().out
