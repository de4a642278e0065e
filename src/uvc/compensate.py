"""Compensation: refit what reads the removed groups, so a pruned ViT recovers without any training.

Removing heads, head dimensions or MLP neurons changes the output of the one layer that reads them:
the attention output projection `attn.proj` (it reads heads x dims) and the MLP's `fc2` (it reads
the neurons). Every other weight of a block only *produces* groups, and what it produces for the
kept groups is unchanged. So after slimming, each remaining `proj` and `fc2` is refitted by ridge
least squares, in closed form, to reproduce the dense model from the features the slimmed block
still computes; no labels, no gradient step.

The walk is sequential, on the slimmed model's own activations: block l is fitted on the input it
receives from the already-compensated blocks before it, so it is fitted to the inputs it will see.
Two targets for a branch whose slimmed input is x_s (both before LayerScale):
- "stream" (default): the dense residual stream after this branch, x_d + branch_d(x_d), less x_s, so
  the branch reproduces the dense branch and also pulls back the drift earlier pruning left in the
  stream; a skipped half or block is made up by the next layer that is fitted.
- "block": the dense branch on the slimmed input, branch_d(x_s); each layer repairs only itself.
On the bundled teacher "stream" won on validation at both budgets tried (bench/oneshot.py).
Normal equations are summed batch by batch in float64, so memory is set by the layer widths, not by
images x tokens; the tokens entering the blocks are kept for the calibration images (one tensor
of images x tokens x dim).

The formula, in `ridge_refit`: with features a (one row per token), target y, slimmed weights W0,
    minimise  sum_rows |W a + b - y|^2 + lambda * s * |W - W0|^2,   s = mean diagonal of A^T A,
the bias b unpenalised. The penalty pulls towards the slimmed layer's own weights, not towards
zero: a layer is never fitted worse than it started (lambda -> infinity keeps W0 and refits only the
bias), and with nothing removed the dense weights are the exact solution, so the model does not
change. The free bias is the least-squares intercept, which absorbs the removed groups' mean
contribution; `mode="bias"` does only that fold, b += W0[:, removed] @ E[removed features].
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import nn

from .errors import UVCError
from .adapters import adapter_for
from .plan import LayerPlan
from .slim import slim


MODES = ("refit", "bias")
TARGETS = ("stream", "block")
DEFAULT_RIDGE = 1e-3  # lambda, chosen on the Fashion-MNIST validation split (bench/oneshot.py)
DEFAULT_MAX_IMAGES = 1000
HALVES = (("attn", "norm1", "ls1", "proj"), ("mlp", "norm2", "ls2", "fc2"))  # branch, its norm, LayerScale, reader


class _Stop(Exception):
    """Raised by the capture hook: nothing after the blocks' input is needed."""


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def block_inputs(model: nn.Module, batches: Iterable, max_images: int) -> list[torch.Tensor]:
    """The tokens entering the model's blocks stack, one tensor per batch, at most `max_images` images.

    A forward pre-hook on the blocks `nn.Sequential` catches them whatever the family puts before
    it (patch or T2T embedding, class token, positions), and the forward stops there.
    """
    blocks, p = adapter_for(model).blocks(model), next(model.parameters())
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0])
        raise _Stop

    handle = blocks.register_forward_pre_hook(hook)
    seen = 0
    try:
        for batch in batches:
            x = _images(batch)[: max_images - seen]
            if not len(x):
                break
            try:
                model(x.to(p.device, p.dtype))
            except _Stop:
                pass
            seen += len(x)
    finally:
        handle.remove()
    if not captured:
        raise UVCError("no calibration images reached the blocks: pass batches of images (or (images, labels) pairs)")
    return captured


def _branch(block: nn.Module, half: tuple, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's branch output before LayerScale on x, and the input its reading layer saw."""
    branch, norm, _, reader = half
    box = []
    handle = getattr(getattr(block, branch), reader).register_forward_pre_hook(lambda m, a: box.append(a[0]))
    try:
        out = getattr(block, branch)(getattr(block, norm)(x))
    finally:
        handle.remove()
    return out, box[-1]


def _scaled(block: nn.Module, half: tuple, out: torch.Tensor) -> torch.Tensor:
    return getattr(block, half[2])(out)


class NormalEquations:
    """Sums over calibration tokens for one layer: G = [A 1]^T [A 1], C = [A 1]^T Y, |Y|^2, and the
    sum of the dense model's removed features (for the bias fold). float64 throughout."""

    def __init__(self):
        self.G = self.C = self.removed = None
        self.yy, self.n = 0.0, 0

    def add(self, a: torch.Tensor, y: torch.Tensor, removed: torch.Tensor) -> None:
        a, y, removed = (t.flatten(0, -2).double() for t in (a, y, removed))
        a1 = torch.cat([a, a.new_ones(len(a), 1)], 1)
        G, C, r = a1.T @ a1, a1.T @ y, removed.sum(0)
        self.G, self.C, self.removed = (G, C, r) if self.G is None else (self.G + G, self.C + C, self.removed + r)
        self.yy += float((y * y).sum())
        self.n += len(a)

    def error(self, theta: torch.Tensor) -> float:
        """sum_rows |[a 1] theta - y|^2 from the sums alone (theta: [k (+1), out], bias row last if any)."""
        k = len(theta)
        G, C = self.G[:k, :k], self.C[:k]
        return max(self.yy - 2 * float((theta * C).sum()) + float((theta * (G @ theta)).sum()), 0.0)


def ridge_refit(eq: NormalEquations, w0: torch.Tensor, b0: torch.Tensor | None, lam: float) -> torch.Tensor:
    """THE compensation formula: argmin over theta = [W^T; b^T] of |[A 1] theta - Y|^2 + lam s |W - W0|^2.

    Closed form (G + R) theta = C + R theta0 with theta0 = [W0^T; b0^T], R = diag(lam s, ..., lam s, 0),
    s = mean diagonal of A^T A (so lam is scale-free). Without a bias the ones column is left out.
    """
    k = w0.shape[1] + (b0 is not None)
    G, C = eq.G[:k, :k], eq.C[:k]
    theta0 = w0.T.double() if b0 is None else torch.cat([w0.T.double(), b0.double()[None]])
    reg = torch.full((k,), lam * float(eq.G.diagonal()[:w0.shape[1]].mean()), dtype=G.dtype, device=G.device)
    if b0 is not None:
        reg[-1] = 0.0
    theta, info = torch.linalg.solve_ex(G + torch.diag(reg), C + reg[:, None] * theta0)
    if int(info):  # singular only with lam = 0 and fewer independent tokens than features
        theta = torch.linalg.pinv(G) @ C
    return theta


@torch.no_grad()
def _refit_layer(layer: nn.Linear, dense_layer: nn.Linear, removed: torch.Tensor, eq: NormalEquations,
                 mode: str, lam: float) -> dict:
    """Replace `layer`'s weights (in place, in its own dtype and device); return its calibration errors."""
    w0 = layer.weight.detach().double()
    b0 = None if layer.bias is None else layer.bias.detach().double()
    theta0 = w0.T if b0 is None else torch.cat([w0.T, b0[None]])
    if mode == "refit":
        theta = ridge_refit(eq, w0, b0, lam)
    elif b0 is None:
        theta = theta0  # no bias to fold into
    else:
        fold = dense_layer.weight.detach().double()[:, removed] @ (eq.removed / eq.n)
        theta = torch.cat([w0.T, (b0 + fold)[None]])
    layer.weight.copy_(theta[:w0.shape[1]].T.to(layer.weight.dtype))
    if b0 is not None:
        layer.bias.copy_(theta[-1].to(layer.bias.dtype))
    scale = eq.n * w0.shape[0]
    return {"features": w0.shape[1], "mse_before": eq.error(theta0) / scale, "mse_after": eq.error(theta) / scale}


def _kept_columns(layer: LayerPlan, half: tuple, dense_block: nn.Module) -> torch.Tensor:
    """Columns of the dense reading layer that the plan keeps (dense numbering, ascending as slimming keeps them)."""
    kept = layer.attention_columns(dense_block.attn.head_dim) if half[0] == "attn" else layer.neurons
    return torch.tensor(kept, dtype=torch.long)


def _removed_columns(layer: LayerPlan, half: tuple, dense_block: nn.Module) -> torch.Tensor:
    """Columns of the dense reading layer that the plan removes (dense numbering)."""
    reader = getattr(getattr(dense_block, half[0]), half[3])
    mask = torch.ones(reader.in_features, dtype=torch.bool)
    mask[_kept_columns(layer, half, dense_block)] = False
    return torch.nonzero(mask).flatten()


@torch.no_grad()
def compensate_masked(model: nn.Module, plan: list[LayerPlan], batches: Iterable, **options) -> dict:
    """Compensate a gated model for the groups `plan` is about to mask, in place: the search's cut start.

    The refit is `compensate`'s, on `slim(model, plan)` against `model` (its masks must still be all
    ones); the kept columns and the bias of each `proj` and `fc2` then take the refitted values. The
    removed columns keep their weights: masked, they do nothing, and the search may bring them back.
    """
    slimmed = slim(model, plan)
    stats = compensate(model, slimmed, plan, batches, **options)
    blocks = list(adapter_for(model).blocks(model))
    for l, slim_block in _survivors(plan, blocks, list(adapter_for(slimmed).blocks(slimmed))).items():
        for half in HALVES:
            if getattr(slim_block, half[0]) is None:
                continue
            reader, refit = (getattr(getattr(b, half[0]), half[3]) for b in (blocks[l], slim_block))
            cols = _kept_columns(plan[l], half, blocks[l]).to(reader.weight.device)
            reader.weight[:, cols] = refit.weight.to(reader.weight.dtype)
            if reader.bias is not None:
                reader.bias.copy_(refit.bias)
    return stats


def _survivors(plan: list[LayerPlan], dense_blocks: list, slim_blocks: list) -> dict[int, nn.Module]:
    """Dense block index -> its slimmed block; blocks with neither half left were dropped by slimming."""
    halves = [(p.attn and bool(p.heads) and any(p.dims), p.mlp and bool(p.neurons)) for p in plan]
    kept = [l for l, h in enumerate(halves) if any(h)]
    if len(plan) != len(dense_blocks) or len(kept) != len(slim_blocks) or any(
            (s.attn is not None, s.mlp is not None) != halves[l] for l, s in zip(kept, slim_blocks)):
        raise UVCError("the plan does not describe this slimmed model; pass the plan `uvc.slim(dense, plan)` was given")
    return dict(zip(kept, slim_blocks))


@torch.no_grad()
def compensate(dense: nn.Module, slimmed: nn.Module, plan: list[LayerPlan], batches: Iterable,
               ridge: float = DEFAULT_RIDGE, max_images: int = DEFAULT_MAX_IMAGES, mode: str = "refit",
               target: str = "stream") -> dict:
    """Refit every remaining `attn.proj` and `mlp.fc2` of `slimmed` (in place) against `dense`.

    `slimmed` must be `uvc.slim(dense, plan)`; `batches` yields images or (images, labels) pairs
    (labels unused), of which the first `max_images` are used. `mode`: "refit" (ridge least squares,
    `ridge_refit`) or "bias" (fold the removed groups' mean contribution into the bias only);
    `target`: "stream" or "block" (module docstring). Returns, per fitted layer, the mean squared
    error against its target on the calibration tokens before and after.
    """
    if mode not in MODES or target not in TARGETS:
        raise UVCError(f"compensation mode {mode!r} / target {target!r}: expected one of {MODES} / {TARGETS}")
    if not ridge >= 0:
        raise UVCError(f"ridge {ridge} must be >= 0")
    start = time.perf_counter()
    dense_blocks, slim_blocks = list(adapter_for(dense).blocks(dense)), list(adapter_for(slimmed).blocks(slimmed))
    survivors = _survivors(plan, dense_blocks, slim_blocks)
    modes = dense.training, slimmed.training
    dense.eval(), slimmed.eval()
    dp = next(dense.parameters())
    try:
        xs = block_inputs(slimmed, batches, max_images)  # the slimmed stream, sequentially compensated
        xd = [x.to(dp.device, dp.dtype) for x in xs]  # the dense stream
        images, tokens, layers = sum(len(x) for x in xs), sum(x.shape[0] * x.shape[1] for x in xs), []
        for l, db in enumerate(dense_blocks):
            sb = survivors.get(l)
            for half in HALVES:
                d_next = [x + _scaled(db, half, _branch(db, half, x)[0]) for x in xd] if target == "stream" else xd
                if sb is not None and getattr(sb, half[0]) is not None:
                    removed, eq = _removed_columns(plan[l], half, db).to(dp.device), NormalEquations()
                    gamma = getattr(getattr(db, half[2]), "gamma", None)
                    for x, after in zip(xs, d_next):
                        y, f = _branch(db, half, x.to(dp.device, dp.dtype))
                        if target == "stream":
                            y = after.double() - x.double()
                            y = y if gamma is None else y / gamma.double()
                        eq.add(_branch(sb, half, x)[1], y, f[..., removed])
                    dense_reader, reader = (getattr(getattr(b, half[0]), half[3]) for b in (db, sb))
                    layers.append({"block": l, "half": half[0], **_refit_layer(reader, dense_reader, removed, eq, mode, ridge)})
                    xs = [x + _scaled(sb, half, _branch(sb, half, x)[0]) for x in xs]
                xd = d_next
    finally:
        dense.train(modes[0]), slimmed.train(modes[1])
    return {"mode": mode, "target": target, "ridge": ridge, "images": images, "tokens": tokens, "layers": layers,
            "seconds": time.perf_counter() - start}
