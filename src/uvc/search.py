"""The UVC search: one object that owns the decision variables, the duals and the updates that move them.

Primal variables: the weights (their optimizer step is the training loop's), per-block removal
*ratios* for heads, head dimensions and MLP neurons (continuous; the integer count is
straight-through rounding), and a keep *margin* for each block and each half (kept while >= 0).
Dual variables: `z`, the price of the budget R <= B, and `y[l, k]` for "the groups marked for
removal are zero" (Phi[l, k] = their summed squared norms, relative to the layer's total for that kind).

    Lagrangian = task + KD + sum_lk y_lk * Phi_lk(W, count_lk) + z * (R(counts, gates) - B)

Every decision is priced on one scale. The loss side is the *Taylor* estimate of what a decision
costs: the moving average of |dL/dm|, the gradient of the loss with respect to the mask value m of a
group, or the keep value of a half (a block: both halves' together), i.e. the loss's first-order change
when it is removed. First order adds up: a half's estimate is on the scale of the sum over its groups,
so gates and widths compare. The budget side is z times the MACs the decision saves on its own. Every count and margin steps by its lr times
the relative imbalance of the two, (cost - saving) / (cost + saving): a half is skipped exactly when
z * (its MACs) outweighs its Taylor cost for long enough, and width goes where the next group costs
the least per MAC.

Before the first step (`compress` does this), one pass of the input model over the calibration images
scores every group as one-shot does (weight norm x mean squared activation): by default the counts start
at one-shot's plan (`init="activation"`, `start_from`) and the groups are ranked by those scores
(`importance="activation"`, `rank_by`); with `init="uniform"` they start at the same keep fraction
everywhere, with `importance="taylor"` the Taylor estimates rank them too.

One iteration, in the order `compress` calls the methods:
1. `mark_groups`      masks from the current counts, the least important groups first; groups marked for
                      removal sit at `fade` (1 -> 0 over `fade_epochs`: the start is gradual, not a cut;
                      with `start="compensate"` they are cut at once, after a least-squares refit)
   `set_gates`        the hard keep decisions (skipped parts also at `fade`); probes for the gradients
2. (the weights take an optimizer step on task + KD: the training loop's job)
3. `record_importance` Taylor moving averages from the probes' gradients (the costs; with importance="taylor" the ranking too)
4. `proximal_shrink`  the y * Phi term's proximal step on the weights: marked groups shrink by 1 / (1 + 2 lr y)
5. `allocation_step`  counts and margins: one projected step against (Taylor cost - z * dR) / (cost + z * dR)
6. `dual_step`        y += lr_y * Phi (projected on >= 0);  z = the price of a MAC the counts' balance implies
Steps 5 and 6 wait for the warm-up to end. `final_plan` fits the counts exactly to the budget. With
`end="rewind"` (the default) what post-training starts from is the *input* model slimmed at that plan,
its proj / fc2 refitted by least squares: the search's weight steps serve to find the plan.

The paper's own optimisation is one switch away for each part (`--preset paper` sets them all, presets.py):
`dual="ascent"`: ratios step along the Lagrangian's gradient (y * dPhi + z * dR, clipped, no projection
onto the budget) and z rises and falls by projected gradient ascent on R - B; `gates="gumbel"`: the
margins are logits, training sees Gumbel-sigmoid samples of the gates, and the logits take momentum-SGD
steps on the Lagrangian's gradient (task gradient through the samples + w_g * z * dR/dlogit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .budget import fit_to_budget, plan_counts, plan_of_counts, removal_costs, uniform_removal
from .engine import Schedule
from .errors import UVCError
from .gates import GatedBlock, gated_blocks
from .importance import GroupNorms, group_norms, keep_masks
from .plan import LayerPlan
from .resource import Skeleton

IMPORTANCE = ("taylor", "activation", "norm")
STARTS = ("fade", "compensate")
INITS = ("uniform", "activation")
ENDS = ("searched", "rewind")
DUALS = ("price", "ascent")
GATE_KINDS = ("hard", "gumbel")
GATES = ("block", "attn", "mlp")
# The gates each mode learns. A run decides "auto" before it builds its Search (CompressConfig.skip_gates); a Search
# built by hand has no latency batch to decide by and learns none, as auto does for every budget but batch-1 latency.
SKIP_GATES = {"auto": (), "both": GATES, "block": ("block",), "halves": ("attn", "mlp"), "none": ()}
SKIP_MODES = tuple(SKIP_GATES)


@dataclass
class SearchConfig:
    """Search hyper-parameters. Most defaults were tuned on the bundled Fashion-MNIST demo; the start plan and the
    ranking were chosen on validation with a pretrained DINOv2-S/14 as well (docs/method.md, "Where the search stands")."""

    schedule: Schedule = field(default_factory=lambda: Schedule(epochs=1.0, lr=1e-4, weight_decay=0.05,
                                                                warmup_epochs=0.05))
    warmup_epochs: float = 0.2  # the Taylor estimates settle before the counts, the gates and the duals move
    fade_epochs: float = 0.5  # marked groups and skipped halves fade from 1 to 0 over this many epochs (0: at once)
    start: str = "fade"  # "compensate": cut the start plan at once, its proj / fc2 refitted by least squares (no fade)
    init: str = "activation"  # the start plan: one-shot's global allocation by weight norm x mean squared activation
    # on the calibration images (`Search.start_from`), or "uniform": the same keep fraction everywhere (docs/method.md)
    end: str = "rewind"  # post-train the input model's weights slimmed at the searched plan and refitted by least
    # squares ("rewind"), or the searched weights slimmed ("searched", the paper's way); docs/method.md compares them
    prune: bool = True
    skip: str = "auto"  # which skip gates exist: block, halves (attention / MLP), both, or none; "auto": both under a
    # latency budget at batch 1, none elsewhere (CompressConfig.skip_gates(); docs/method.md, "Skip gates")
    importance: str = "activation"  # which groups are removed first: "activation" (one-shot's: weight norm x mean
    # squared activation of the input model on the calibration images), "taylor" (the loss's sensitivity) or "norm"
    width_multiple: int = 1  # kept head and MLP widths at multiples of this (8 suits GPU kernels), one-shot's too
    frozen: bool = False  # the benchmark's control: train the masked start plan, but move no count, gate or dual
    importance_decay: float = 0.9  # moving average of the mask gradients' magnitudes
    ratio_lr: float = 0.02
    gate_lr: float = 0.1  # a margin starts at 1: ten steps under the strongest pressure skip a half
    z_lr: float = 1.0  # skipping alone: z *= exp(z_lr * (R - B)) per step; dual="ascent": z += z_lr * (R - B)
    z_step_clip: float = 0.5
    y_init: float = 1e-3
    y_lr: float = 20.0
    # The paper's optimisation, one switch each (uvc's defaults first; docs/method.md, "Presets"):
    dual: str = "price"  # "price": z is the price the counts imply, counts projected onto R = B every step;
    # "ascent": ratios take the Lagrangian's gradient steps and z takes gradient ascent steps (the paper's)
    gates: str = "hard"  # "hard": training sees the hard decisions; "gumbel": Gumbel-sigmoid samples (the paper's)
    gate_temperature: float = 0.5  # gates="gumbel": the samples' temperature
    gate_weight: float = 5e-4  # gates="gumbel": w_g, the weight of the budget's pull on the gate logits
    gate_momentum: float = 0.9  # gates="gumbel": momentum of the logits' SGD steps (lr `gate_lr`)
    z_init: float = 1e-3  # dual="ascent": z's starting value

    def fade_steps(self, steps_per_epoch: int) -> int:
        """Steps over which marked groups fade out: none with a compensated start, which cuts them at once."""
        return 0 if self.start == "compensate" else round(self.fade_epochs * steps_per_epoch)

    def validate(self) -> None:
        self.schedule.validate("search", allow_zero=False)
        if self.skip not in SKIP_MODES:
            raise UVCError(f"skip mode {self.skip!r} is not one of {', '.join(SKIP_MODES)}")
        if self.start not in STARTS:
            raise UVCError(f"search start {self.start!r} is not one of {', '.join(STARTS)}")
        if self.init not in INITS:
            raise UVCError(f"search init {self.init!r} is not one of {', '.join(INITS)}")
        if self.end not in ENDS:
            raise UVCError(f"search end {self.end!r} is not one of {', '.join(ENDS)}")
        if self.importance not in IMPORTANCE:
            raise UVCError(f"importance {self.importance!r} is not one of {', '.join(IMPORTANCE)}")
        if self.warmup_epochs < 0 or self.fade_epochs < 0:
            raise UVCError(f"search warm-up and fade epochs must be >= 0, got {self.warmup_epochs} and {self.fade_epochs}")
        if self.width_multiple < 1:
            raise UVCError(f"width multiple must be >= 1, got {self.width_multiple}")
        if not 0 <= self.importance_decay < 1:
            raise UVCError(f"importance decay must be in [0, 1), got {self.importance_decay}")
        if self.dual not in DUALS:
            raise UVCError(f"search dual {self.dual!r} is not one of {', '.join(DUALS)}")
        if self.gates not in GATE_KINDS:
            raise UVCError(f"search gates {self.gates!r} is not one of {', '.join(GATE_KINDS)}")
        if self.gate_temperature <= 0 or not 0 <= self.gate_momentum < 1 or self.gate_weight < 0 or self.z_init < 0:
            raise UVCError("the gate temperature must be > 0, the gate momentum in [0, 1), the gate weight and "
                           f"z_init >= 0 (got {self.gate_temperature}, {self.gate_momentum}, {self.gate_weight}, {self.z_init})")


def fade_at(step: int, fade_steps: int) -> float:
    """The value of marked groups and skipped halves at a step of the search: 1 -> 0 linearly, then 0."""
    return max(0.0, 1.0 - step / fade_steps) if fade_steps > 0 else 0.0


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward.

    A ceiling (the reference's choice) removes a whole group on the first step off zero, which for a
    layer of 2-3 heads is a jump of a third of its attention and makes R oscillate. Rounding to the
    nearest count removes a group once half of it is marked. The final fit is exact anyway.
    """
    return x + (torch.round(x) - x).detach()


def _state_dtype(weight: torch.Tensor) -> torch.dtype:
    """The search state follows the weights' dtype, except that half types keep it in float32:
    ratio steps of 0.02 and small moving-average updates would vanish in bf16's 8-bit mantissa."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class Search(nn.Module):
    """Ratios, keep margins, Taylor estimates and duals for one gated model's blocks, and one method per
    part of an iteration.

    The state lives on the blocks' device, in their dtype (float32 for half types), and `.to()` moves it.
    """

    def __init__(self, model: nn.Module, budget: float, cfg: SearchConfig, skeleton: Skeleton):
        super().__init__()
        self.cfg, self.budget, self.skel = cfg, budget, skeleton
        self._blocks: tuple[GatedBlock, ...] = tuple(gated_blocks(model))  # a tuple: not registered as submodules
        weight = self._blocks[0].attn.qkv.weight if self._blocks else torch.zeros(())
        like = torch.zeros((), device=weight.device, dtype=_state_dtype(weight))
        depth = skeleton.depth
        self.register_buffer("sizes", skeleton.sizes(like))
        start = uniform_removal(skeleton, budget, cfg.width_multiple).to(like) if cfg.prune else torch.zeros_like(self.sizes)
        self.ratios = nn.Parameter(start / self.sizes)
        self.register_buffer("gate_margin", torch.ones(depth, len(GATES), device=like.device, dtype=like.dtype))
        on = SKIP_GATES[cfg.skip]
        self.register_buffer("gate_enabled", torch.tensor([g in on for g in GATES], device=like.device))
        self.register_buffer("y", torch.full((depth, 3), cfg.y_init, device=like.device, dtype=like.dtype))
        z = cfg.z_init if cfg.dual == "ascent" else 0.0
        self.register_buffer("z", torch.full((), z, device=like.device, dtype=like.dtype))
        self.register_buffer("gate_velocity", torch.zeros_like(self.gate_margin))  # gates="gumbel": SGD momentum
        self.register_buffer("price", torch.zeros((), device=like.device, dtype=like.dtype))  # set at the warm-up's end
        self.register_buffer("shrink", torch.ones((depth, 3), device=like.device, dtype=like.dtype))  # cumulative
        self.register_buffer("step_count", torch.tensor(0, device=like.device))
        # Taylor estimates: per head dimension and per neuron of each block, and per gate.
        for l, block in enumerate(self._blocks):
            self.register_buffer(f"taylor_attn{l}", torch.zeros_like(block.dim_mask, dtype=like.dtype))
            self.register_buffer(f"taylor_mlp{l}", torch.zeros_like(block.neuron_mask, dtype=like.dtype))
        self.register_buffer("taylor_keep", torch.zeros_like(self.gate_margin))
        if cfg.importance == "activation":  # set once by `rank_by` before the first step; saved with the search
            self.register_buffer("activation_ranked", torch.tensor(False, device=like.device))
            for l, block in enumerate(self._blocks):
                self.register_buffer(f"activation_attn{l}", torch.zeros_like(block.dim_mask, dtype=like.dtype))
                self.register_buffer(f"activation_mlp{l}", torch.zeros_like(block.neuron_mask, dtype=like.dtype))
        # Recomputed from the weights and the estimates at every mark_groups, so not saved.
        self.register_buffer("phi", torch.zeros_like(self.y), persistent=False)
        self.register_buffer("next_norm", torch.zeros_like(self.y), persistent=False)
        self.register_buffer("next_cost", torch.zeros_like(self.y), persistent=False)
        self._keep_probe: torch.Tensor | None = None
        self._gate_logits: torch.Tensor | None = None  # gates="gumbel": the leaf the sampled gates were drawn from

    @torch.no_grad()
    def start_from(self, plan: list[LayerPlan]) -> None:
        """Start the counts at `plan`'s widths instead of the uniform plan's, and its skipped halves (or blocks,
        where only block gates exist) skipped, to fade out like the groups (before the first step)."""
        removed, attn, mlp = plan_counts(self.skel, plan)
        self.ratios.copy_(removed.to(self.ratios) / self.sizes)
        skipped = torch.stack([attn, mlp], dim=1).to(self.gate_margin) == 0
        if bool(skipped.any()):
            margin = torch.where(skipped, -1.0, 1.0).to(self.gate_margin)
            if bool(self.gate_enabled[1:].all()):  # half gates: each half as the plan has it
                self.gate_margin[:, 1:] = margin
            elif bool(self.gate_enabled[0]) and torch.equal(skipped[:, 0], skipped[:, 1]):  # whole blocks only
                self.gate_margin[:, 0] = margin[:, 0]
            else:
                raise UVCError(f"the start plan skips halves that --skip {self.cfg.skip} has no gates for")

    @torch.no_grad()
    def rank_by(self, scores: list[GroupNorms]) -> None:
        """importance="activation": the per-group scores (`oneshot.group_importance`) that rank every block's groups."""
        for l, score in enumerate(scores):
            getattr(self, f"activation_attn{l}").copy_(score.dims)
            getattr(self, f"activation_mlp{l}").copy_(score.neurons)
        self.activation_ranked.fill_(True)

    # ---- decisions -------------------------------------------------------------------------
    def removed(self) -> torch.Tensor:
        """[L, 3] integer removal counts (straight-through rounding, so dR/dratio flows)."""
        return ste_round(self.ratios * self.sizes)

    def hard_keep(self) -> torch.Tensor:
        """[L, 3] 1 where the block / attention half / MLP half is kept (always where gating is off)."""
        keep = (self.gate_margin >= 0).to(self.gate_margin.dtype)
        return torch.where(self.gate_enabled, keep, torch.ones_like(keep))

    @staticmethod
    def _halves(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A half runs if its block and the half itself are kept."""
        return keep[:, 0] * keep[:, 1], keep[:, 0] * keep[:, 2]

    def resource(self) -> torch.Tensor:
        """R = MACs / dense MACs of the architecture the current counts and gates describe."""
        attn, mlp = self._halves(self.hard_keep())
        return self.skel.ratio(self.removed(), attn, mlp)

    def _taylor(self, l: int) -> GroupNorms:
        return GroupNorms(dims=getattr(self, f"taylor_attn{l}"), neurons=getattr(self, f"taylor_mlp{l}"))

    def _uses_taylor(self) -> bool:
        """Taylor ranks groups once it has been measured; the frozen control never measures it."""
        return self.cfg.importance == "taylor" and not self.cfg.frozen and int(self.step_count) > 0

    def importance(self, l: int) -> GroupNorms:
        """Block l's group importance in the configured sense: Taylor estimates, activation scores or weight norms."""
        if self._uses_taylor():
            return self._taylor(l)
        if self.cfg.importance == "activation" and bool(self.activation_ranked):  # the frozen control ranks by it too
            return GroupNorms(dims=getattr(self, f"activation_attn{l}"), neurons=getattr(self, f"activation_mlp{l}"))
        return group_norms(self._blocks[l])

    # ---- 1. masks and gates ----------------------------------------------------------------
    @torch.no_grad()
    def mark_groups(self, fade: float = 0.0, probe: bool = False) -> None:
        """Mask the least important groups by the current counts (at `fade`); record Phi, and the norm and
        the Taylor cost of the next group in line. `probe`: leaf masks whose gradients `record_importance` reads."""
        counts = self.removed().detach().long()
        for l, block in enumerate(self._blocks):
            rank, norms = self.importance(l), group_norms(block)
            nh, nd, nm = counts[l].tolist()
            block.probes = None
            block.apply_masks(*keep_masks(rank, nh, nd, nm), fade=fade)
            if probe:
                block.probes = (block.attention_mask().detach().clone().requires_grad_(True),
                                block.neuron_mask.detach().clone().requires_grad_(True))
            ordered = _in_removal_order(rank, norms)
            totals = torch.stack([o.sum() for o in ordered]).clamp(min=1e-12)
            self.phi[l] = torch.stack([o[:n].sum() for o, n in zip(ordered, (nh, nd, nm))]) / totals
            self.next_norm[l] = torch.stack([F.pad(o, (0, 1))[n] for o, n in zip(ordered, (nh, nd, nm))]) / totals
            costs = _in_removal_order(rank, self._taylor(l))
            self.next_cost[l] = torch.stack([F.pad(o, (0, 1))[n] for o, n in zip(costs, (nh, nd, nm))])

    def set_gates(self, fade: float = 0.0, probe: bool = False, sample: bool = False) -> None:
        """The hard keep decisions, skipped parts at `fade`; with gates="gumbel" and `sample` (training),
        Gumbel-sigmoid samples of the gates instead.

        `probe`: the halves' effective keep values [L, 2] become a leaf whose gradient `record_importance`
        reads. Taken on the effective values (block x half), not on the gates, the gradient stays
        informative when the block gate is off: it is what restoring each half would gain.
        """
        self._gate_logits = None
        if sample and self.cfg.gates == "gumbel" and bool(self.gate_enabled.any()):
            self._set_sampled_gates()
            return
        keep = torch.where(self.hard_keep() > 0, 1.0, fade).to(self.gate_margin)
        halves = torch.stack(self._halves(keep), dim=1)
        probe = probe and bool(self.gate_enabled.any())  # the estimates only serve gates that exist
        self._keep_probe = halves.requires_grad_(True) if probe else None
        for l, block in enumerate(self._blocks):
            block.attn_keep, block.mlp_keep = (halves[l, 0], halves[l, 1]) if probe else (float(halves[l, 0]), float(halves[l, 1]))

    def _set_sampled_gates(self) -> None:
        """keep = sigmoid((logit + logistic noise) / temperature) per enabled gate, 1 elsewhere (the paper's
        Gumbel-sigmoid). The noise comes from a generator seeded by the run's seed and the step, so every
        DDP rank draws the same gates and a resumed run draws what an unbroken one would."""
        seed = hash((torch.initial_seed(), int(self.step_count))) % 2 ** 63
        uniform = torch.rand(self.gate_margin.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        noise = (uniform.log() - (-uniform).log1p()).to(self.gate_margin)
        self._gate_logits = self.gate_margin.detach().clone().requires_grad_(True)
        soft = torch.sigmoid((self._gate_logits + noise) / self.cfg.gate_temperature)
        keep = torch.where(self.gate_enabled, soft, torch.ones_like(soft))
        halves = torch.stack(self._halves(keep), dim=1)
        for l, block in enumerate(self._blocks):
            block.attn_keep, block.mlp_keep = halves[l, 0], halves[l, 1]

    def probe_gradients(self) -> list[torch.Tensor]:
        """The gradients `record_importance` and the gate steps read (under DDP, all-reduced first: they are
        rank-dependent)."""
        grads = [p.grad for b in self._blocks for p in (b.probes or ()) if p.grad is not None]
        for leaf in (self._keep_probe, self._gate_logits):
            if leaf is not None and leaf.grad is not None:
                grads.append(leaf.grad)
        return grads

    # ---- 3. importance ---------------------------------------------------------------------
    @torch.no_grad()
    def record_importance(self) -> None:
        """Moving averages of the probe gradients' magnitudes: the Taylor estimate of each group's and gate's cost."""
        decay = self.cfg.importance_decay if int(self.step_count) > 0 else 0.0  # the first step sets them

        def update(estimate: torch.Tensor, grad: torch.Tensor | None) -> None:
            if grad is not None:
                estimate.mul_(decay).add_((1 - decay) * grad.to(estimate).abs())

        for l, block in enumerate(self._blocks):
            attn, mlp = block.probes or (None, None)
            update(getattr(self, f"taylor_attn{l}"), attn.grad if attn is not None else None)
            update(getattr(self, f"taylor_mlp{l}"), mlp.grad if mlp is not None else None)
        if self._keep_probe is not None and self._keep_probe.grad is not None:
            attn, mlp = self._keep_probe.grad.unbind(1)  # a block's estimate: both halves together
            update(self.taylor_keep, torch.stack([attn + mlp, attn, mlp], dim=1))
        self.step_count += 1

    # ---- 4. proximal shrink ----------------------------------------------------------------
    @torch.no_grad()
    def proximal_shrink(self, lr: float) -> None:
        """W_group /= (1 + 2 lr y) for every group marked for removal."""
        factors = 1.0 / (1.0 + 2.0 * lr * self.y)  # [L, 3]: heads, dimensions, neurons
        self.shrink.mul_(factors)
        for l, block in enumerate(self._blocks):
            weight = block.attn.qkv.weight
            f_head, f_dim, f_neuron = factors[l].to(weight.dtype)
            one = weight.new_ones(())
            factor = torch.where(block.head_mask[:, None] < 1, f_head, one) * torch.where(block.dim_mask < 1, f_dim, one)
            if bool((factor < 1).any()):
                heads, head_dim = factor.shape
                qkv, proj = block.attn.qkv, block.attn.proj
                qkv.weight.view(3, heads, head_dim, -1).mul_(factor[None, :, :, None])
                if qkv.bias is not None:
                    qkv.bias.view(3, heads, head_dim).mul_(factor[None])
                proj.weight.view(proj.out_features, heads, head_dim).mul_(factor[None])
            f_n = torch.where(block.neuron_mask < 1, f_neuron, one)
            block.mlp.fc1.weight.mul_(f_n[:, None])
            if block.mlp.fc1.bias is not None:
                block.mlp.fc1.bias.mul_(f_n)
            block.mlp.fc2.weight.mul_(f_n[None, :])

    # ---- 5. allocation step ----------------------------------------------------------------
    def _budget_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dR/dratio [L, 3] at the current counts and hard gates, and dR/dkeep [L, 3]: the MACs each gate
        saves on its own (a half's as if its block ran, a block's as if both halves ran), so a gate whose
        partner is off still sees what it saves, and skipped levels do not lock each other in."""
        with torch.enable_grad():
            keep = self.hard_keep().requires_grad_(True)
            attn, mlp = self._halves(keep)
            removed = self.removed()
            (d_ratio,) = torch.autograd.grad(self.skel.ratio(removed, attn, mlp), [self.ratios])
            removed, ones = removed.detach(), torch.ones_like(keep[:, 0])
            gate = torch.ones_like(keep).requires_grad_(True)  # block, attention half, MLP half: each on its own
            alone = (self.skel.ratio(removed, gate[:, 0], gate[:, 0]) + self.skel.ratio(removed, gate[:, 1], ones)
                     + self.skel.ratio(removed, ones, gate[:, 2]))  # each term reads one column of `gate`
            (d_keep,) = torch.autograd.grad(alone, [gate])
            return d_ratio, d_keep

    def allocation_step(self) -> None:
        """One step of margins and counts against their Lagrangian imbalance, then counts back onto the budget.

        Per unit of keep, keeping a gate costs `z * dR/dkeep` and saves its Taylor cost; per unit of
        ratio, removing more costs `sizes * next_cost` (the Taylor cost of the next group, times the
        groups a unit of ratio holds) and saves `z * dR/dratio`. Each variable moves by its lr times the
        imbalance (cost - saving) / (cost + saving), in [-1, 1]: one rule for gates and widths, whatever
        the spread of the Taylor costs over layers (orders of magnitude). The ratios are then shifted
        together until R = B at the current gates, so a skipped half hands its MACs back to width at once.

        With dual="ascent" the ratios take the paper's step instead (`_lagrangian_ratio_step`), and with
        gates="gumbel" the gate logits do (`_lagrangian_gate_step`).
        """
        d_ratio, d_keep = self._budget_gradients()
        with torch.no_grad():
            if self.cfg.gates == "gumbel":
                self._lagrangian_gate_step(d_keep)
            else:
                g_keep = torch.where(self.gate_enabled, _imbalance(self.z * d_keep, self.taylor_keep), torch.zeros_like(d_keep))
                self.gate_margin.sub_(self.cfg.gate_lr * g_keep)
            if self.cfg.prune and self.cfg.dual == "ascent":
                self._lagrangian_ratio_step(d_ratio)
            elif self.cfg.prune:
                g_ratio = _imbalance(self.sizes * self.next_cost, -self.z * d_ratio)
                self.ratios.copy_(self._onto_budget(self.ratios - self.cfg.ratio_lr * g_ratio))

    def _lagrangian_ratio_step(self, d_ratio: torch.Tensor) -> None:
        """ratio -= ratio_lr * dL/dratio, kept in [0, (size - 1) / size]: no projection onto the budget.

        dL/dratio = y * dPhi/dratio + z * dR/dratio, where dPhi/dratio is the relative norm of the next group
        in line times the groups a unit of ratio holds. The gradient is scaled to a largest entry of at most 1,
        as the reference clips the counts' gradient (its infinity norm, at 1.0)."""
        grad = self.y * self.sizes * self.next_norm + self.z * d_ratio
        grad = grad / grad.abs().max().clamp(min=1.0)
        upper = (self.sizes - 1) / self.sizes
        self.ratios.copy_(torch.minimum(torch.clamp(self.ratios - self.cfg.ratio_lr * grad, min=0.0), upper))

    def _lagrangian_gate_step(self, d_keep: torch.Tensor) -> None:
        """Momentum SGD on the gate logits: the task gradient through the last Gumbel samples plus
        w_g * z * dR/dlogit, with dR/dlogit the MACs each gate saves on its own times the slope of the
        noise-free sigmoid(logit / temperature)."""
        t = self.cfg.gate_temperature
        keep = torch.sigmoid(self.gate_margin / t)
        grad = self.cfg.gate_weight * self.z * d_keep * keep * (1 - keep) / t
        if self._gate_logits is not None and self._gate_logits.grad is not None:
            grad = grad + self._gate_logits.grad.to(grad)
        grad = torch.where(self.gate_enabled, grad, torch.zeros_like(grad))
        self.gate_velocity.mul_(self.cfg.gate_momentum).add_(grad)
        self.gate_margin.sub_(self.cfg.gate_lr * self.gate_velocity)

    def _onto_budget(self, ratios: torch.Tensor) -> torch.Tensor:
        """`ratios + t`, clipped to their range, with the smallest shift t that brings R to <= B."""
        upper = (self.sizes - 1) / self.sizes
        attn, mlp = self._halves(self.hard_keep())

        def shifted(t: float) -> torch.Tensor:
            return torch.minimum(torch.clamp(ratios + t, min=0.0), upper)

        def fits(t: float) -> bool:
            return float(self.skel.ratio(torch.round(shifted(t) * self.sizes), attn, mlp)) <= self.budget

        lo, hi = -1.0, 1.0  # R falls as t grows; hi always fits (the budget was checked reachable)
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return shifted(hi)

    # ---- 6. dual step ----------------------------------------------------------------------
    @torch.no_grad()
    def dual_step(self) -> None:
        """The duals: y by projected gradient ascent on Phi; z, the price of the budget.

        With pruning on, the counts sit on the budget after every step, so z is the price their
        balance implies (the Lagrange multiplier of R <= B): the Taylor cost per MAC of the next group,
        the median over the (block, kind) pairs still being traded, smoothed like the Taylor estimates.
        With skipping alone, z rises and falls by exponentiated gradient ascent, z *= e^{lr_z (R - B)},
        from the gates' median price. With dual="ascent" (the paper's), z += lr_z (R - B), projected on >= 0.
        """
        cfg, first = self.cfg, float(self.price) == 0.0  # `price` is set by the first dual step
        if cfg.prune:
            self.y.add_(cfg.y_lr * self.phi).clamp_(min=0.0)
        if cfg.dual == "ascent":  # the paper's: projected gradient ascent of the Lagrangian in z, step clipped
            step = torch.clamp(self.resource() - self.budget, -cfg.z_step_clip, cfg.z_step_clip)
            self.z.add_(cfg.z_lr * step).clamp_(min=0.0)
            return
        if cfg.prune:
            price = self._marginal_price()
            self.z.copy_(price if first else cfg.importance_decay * self.z + (1 - cfg.importance_decay) * price)
        else:
            if first:
                self.z.copy_(self._marginal_price())
            step = torch.clamp(self.resource() - self.budget, -cfg.z_step_clip, cfg.z_step_clip)
            self.z.mul_(torch.exp(cfg.z_lr * step))
        if first:
            self.price.copy_(self.z)

    def _marginal_price(self) -> torch.Tensor:
        """Taylor cost per unit of R of the next move: the median over the widths still free to move both
        ways (with pruning) or over the enabled gates (skipping alone)."""
        d_ratio, d_keep = self._budget_gradients()
        with torch.no_grad():
            if self.cfg.prune:
                upper = (self.sizes - 1) / self.sizes
                free = (self.ratios > 0) & (self.ratios < upper) & (d_ratio < 0)
                free = free if bool(free.any()) else d_ratio < 0
                prices = (self.sizes * self.next_cost)[free] / (-d_ratio[free])
            else:
                on = self.gate_enabled.expand_as(d_keep) & (d_keep > 0)
                prices = self.taylor_keep[on] / d_keep[on]
            return prices.median().clamp(min=1e-12) if prices.numel() else self.z.new_tensor(1.0)

    def figures(self) -> dict:
        """What the log and report.png show of the search."""
        with torch.no_grad():
            keep = self.hard_keep()
            z = float(self.z) if self.cfg.dual == "ascent" else float(self.z / self.price) if float(self.price) else 0.0
            return {"R": float(self.resource()), "z": z,
                    "y": float(self.y.mean()), "skipped": int((keep == 0).sum()),
                    "shrink": float(self.shrink.min())}

    def current_plan(self) -> list[LayerPlan]:
        """The plan the current counts and gates describe, without fitting (at step 0: the start plan)."""
        attn, mlp = self._halves(self.hard_keep())
        ranks = [self.importance(l) for l in range(len(self._blocks))]
        return plan_of_counts(ranks, self.removed().detach(), attn, mlp)

    # ---- the end of the search -------------------------------------------------------------
    @torch.no_grad()
    def final_plan(self, tolerance: float = 0.01) -> list[LayerPlan]:
        """Hard gates, counts fitted to B - tolerance <= R <= B, and the plan that slimming removes.

        With pruning off, the budget is first met by skipping more (the kept gate whose margin is the
        smallest flips, until R <= B). Whatever the mode, when the skips leave R below the window, the
        skipped gate closest to being kept is restored and width is removed to land in the window:
        halves are too coarse to hit it alone, so the last fraction is width.
        """
        for block in self._blocks:
            block.probes = None
        if not self.cfg.prune:
            while float(self.resource()) > self.budget and self._flip_closest(skipped=False):
                pass
        ranks = [self.importance(l) for l in range(len(self._blocks))]
        costs, removed = removal_costs(ranks, relative=not self._uses_taylor()), self.removed().detach()
        while True:
            attn, mlp = self._halves(self.hard_keep())
            removed = fit_to_budget(self.skel, removed, attn, mlp, costs, self.budget, tolerance,
                                    self.cfg.width_multiple)
            if float(self.skel.ratio(removed, attn, mlp)) >= self.budget - tolerance or not self._flip_closest(skipped=True):
                break
        self.ratios.copy_(removed / self.sizes)
        return self.current_plan()

    def _flip_closest(self, skipped: bool) -> bool:
        """Flip the enabled gate closest to the other decision (a kept one to skip, or a skipped one to keep)."""
        side = (self.gate_margin < 0) if skipped else (self.gate_margin >= 0)
        distance = torch.where(self.gate_enabled & side, self.gate_margin.abs(), torch.inf)
        if torch.isinf(distance).all():
            return False
        l, g = divmod(int(distance.argmin()), len(GATES))
        self.gate_margin[l, g] = 1e-3 if skipped else -1e-3
        return True


def _imbalance(cost: torch.Tensor, saving: torch.Tensor) -> torch.Tensor:
    """(cost - saving) / (cost + saving): > 0 where a move costs more than it saves; 0 where both are 0."""
    return (cost - saving) / (cost + saving).clamp(min=1e-30)


def _in_removal_order(rank: GroupNorms, values: GroupNorms) -> list[torch.Tensor]:
    """`values` of each kind (heads, dimension slots, neurons) in the order `rank` removes them.

    The j-th dimension slot sums each head's j-th dimension to go, since every head drops its own.
    """
    return [values.heads[rank.heads.argsort()], values.dims.gather(1, rank.dims.argsort(dim=1)).sum(0),
            values.neurons[rank.neurons.argsort()]]


__all__ = ["SearchConfig", "Search", "fade_at", "ste_round", "SKIP_MODES", "IMPORTANCE", "STARTS", "INITS", "DUALS", "GATE_KINDS"]
