"""The exact fit to a budget, in steps of one group or of a hardware-friendly width multiple."""
import pytest
import timm
import torch

import uvc
from uvc.adapters import adapter_for
from uvc.budget import (check_budget, fit_to_budget, plan_of_counts, removal_costs, smallest_ratio, uniform_plan,
                        uniform_removal)
from uvc.flops import skeleton_of
from uvc.importance import group_norms
from uvc.resource import HalfTimes, LatencyModel, Skeleton


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("multiple", [1, 8])
def test_fit_lands_in_the_window_with_widths_at_the_multiple(budget, multiple):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224")
    skel, blocks = skeleton_of(model), list(adapter_for(model).blocks(model))
    ones = torch.ones(skel.depth)
    start = uniform_removal(skel, budget, multiple)
    norms = [group_norms(b) for b in blocks]
    removed = fit_to_budget(skel, start, ones, ones, removal_costs(norms), budget, multiple=multiple)
    plan = plan_of_counts(norms, removed)
    slimmed = uvc.slim(model, plan)
    ratio = uvc.macs(slimmed) / uvc.macs(model)
    assert budget - 0.01 <= ratio <= budget
    widths = [(len(p.dims[0]), len(p.neurons)) for p in plan]
    assert all(d % multiple == 0 and m % multiple == 0 for d, m in widths), widths
    if multiple == 1:  # single steps: some width is not a multiple of 8 (the fit is finer)
        assert any(d % 8 or m % 8 for d, m in widths)


def test_uniform_plan_in_steps_of_eight_stays_under_the_budget():
    model = timm.create_model("deit_tiny_patch16_224")
    plan = uniform_plan(model, 0.5, multiple=8)
    assert uvc.macs(uvc.slim(model, plan)) / uvc.macs(model) <= 0.5
    assert {len(p.dims[0]) % 8 for p in plan} == {0} and {len(p.neurons) % 8 for p in plan} == {0}


def test_a_budget_below_what_the_skips_allow_is_named():
    model = timm.create_model("deit_tiny_patch16_224")
    skel, blocks = skeleton_of(model), list(adapter_for(model).blocks(model))
    ones = torch.ones(skel.depth)
    with pytest.raises(uvc.UVCError, match="cannot reach budget"):
        fit_to_budget(skel, torch.zeros(skel.depth, 3), ones, ones, removal_costs([group_norms(b) for b in blocks]), 0.001)


def test_a_budget_only_skipping_reaches_is_refused_with_the_skip_option_named():
    skel = skeleton_of(timm.create_model("deit_tiny_patch16_224"))
    pruned, skipped = smallest_ratio(skel, prune=True, skip=False), smallest_ratio(skel, prune=True, skip=True)
    assert skipped < pruned
    with pytest.raises(uvc.UVCError, match=r"ask for at least .*--skip both.*which reaches"):
        check_budget((pruned + skipped) / 2, skel, prune=True, skip=False)
    check_budget((pruned + skipped) / 2, skel, prune=True, skip=True)  # reachable: no error
    with pytest.raises(uvc.UVCError, match=r"ask for at least [0-9.]+$"):  # below both: no skip advice
        check_budget(skipped / 2, skel, prune=True, skip=False)


def test_fit_gives_back_and_removes_elsewhere_where_a_measured_table_rises_in_big_steps():
    """A noisy latency table: attention with 2-3 heads costs 0.095 at one dimension per head, 0.259 from four.
    Uniform widths stop at R = 0.43 below B = 0.5, and every single group given back then overshoots B."""
    half = HalfTimes(heads=(1, 2, 3), head_dims=(1, 4, 8, 12, 16),
                     attn=((0.0950, 0.0951, 0.0952, 0.0953, 0.0954), (0.0951, 0.259, 0.2591, 0.2592, 0.2593),
                           (0.0952, 0.2591, 0.2592, 0.2593, 0.355)),
                     hidden=(1, 32, 64, 96, 128, 160, 192), mlp=(0.086, 0.087, 0.0871, 0.097, 0.103, 0.110, 0.111))
    skel = Skeleton(tokens=17, dim=[48, 48], heads=[3, 3], head_dim=[16, 16], hidden=[192, 192], fixed=0,
                    resource="latency", latency=LatencyModel(fixed=0.068, blocks=(half, half)))
    ones = torch.ones(2, dtype=torch.float64)
    costs = [[torch.linspace(0.1, 1.0, n) for n in (3, 16, 192)]] * 2
    start = uniform_removal(skel, 0.5)
    assert float(skel.ratio(start, ones, ones)) < 0.49
    removed = fit_to_budget(skel, start, ones, ones, costs, 0.5)
    assert 0.49 <= float(skel.ratio(removed.double(), ones, ones)) <= 0.5
