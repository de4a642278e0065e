"""The resource model: multiply-accumulates and parameters of a ViT as functions of what is kept, in one place.

Conventions follow fvcore and the ViT papers (DeiT-Tiny at 224 px: ~1.26 G MACs): linear layers,
the patch-embedding conv and the two attention matmuls count; norms, softmax and activations do
not. Three callers use the same formulas: the search (counts and keep probabilities as tensors, so
R is differentiable), the budget fit on hard decisions, and `uvc.macs(model)` on a dense, masked or
slimmed network. This module knows nothing of models: `flops.py` reads shapes off a model.

Per block, with H' kept heads of width d', M' kept neurons, N tokens, embedding D:

    attention = N*D*3*H'd' (qkv) + 2*N*N*H'd' (scores, weighted sum) + N*H'd'*D (proj)
    mlp       = 2*N*D*M'
    block     = keep_attn * attention + keep_mlp * mlp        (keep: 1 - skip probability)
    total     = fixed (patch embedding + classifier heads + a family's stem) + sum of blocks

Parameters, with the same keep values (a skipped half takes its LayerNorm and layer scale along):

    attention = 3*H'd'*(D + qkv_bias) + H'd'*D + D*proj_bias + norm1 + ls1
    mlp       = M'*(D + fc1_bias) + M'*D + D*fc2_bias + norm2 + ls2
    total     = fixed (embeddings, tokens, final norm, heads, a family's stem) + sum of blocks

Latency, measured (`latency.py` builds the table on the run's device): per block, seconds of the
attention half at a grid of kept heads x head widths and of the MLP half at a grid of widths, each
half with its LayerNorm, layer scale and residual add (what skipping it saves), plus the fixed parts:

    block     = keep_attn * bilinear(attention grid; H', d') + keep_mlp * linear(MLP grid; M')
    total     = fixed (patch embedding, final norm, head, the forward's own overhead) + sum of blocks

Piecewise linear between grid points, so R stays differentiable in the counts as the formulas are.

A budget is a fraction of one of RESOURCES; `Skeleton.resource` says which one R measures. Another
resource plugs in as a name in RESOURCES, a method of Skeleton giving its differentiable total, and
a measure of a built model in `flops.count`.
"""
from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, field
from functools import cached_property

import torch

RESOURCES = {"macs": "MACs", "params": "parameters", "latency": "measured latency"}  # what a budget can be a fraction of, in words


@dataclass(frozen=True)
class BlockShape:
    """What remains of one transformer block: the one type the FLOPs model, slimming and reports share.

    `heads` heads of width `head_dim` each (one width per layer, so a slimmed layer is a plain
    multi-head attention) and `hidden` MLP neurons, on a residual stream of width `dim`; `attn` /
    `mlp` say whether each half still runs.
    """

    dim: int
    heads: int
    head_dim: int
    hidden: int
    attn: bool = True
    mlp: bool = True

    @property
    def attn_width(self) -> int:
        """Kept heads x kept dimensions per head: the width of q, k and v each."""
        return self.heads * self.head_dim

    @property
    def runs_attn(self) -> bool:
        return self.attn and self.attn_width > 0

    @property
    def runs_mlp(self) -> bool:
        return self.mlp and self.hidden > 0

    def to_dict(self) -> dict:
        return asdict(self)


def attention_macs(tokens, dim, width):
    """qkv projection + scores and weighted sum (q k^T, A v) + output projection; arguments may be tensors."""
    return tokens * dim * 3 * width + 2 * tokens * tokens * width + tokens * width * dim


def mlp_macs(tokens, dim, hidden):
    return 2 * tokens * dim * hidden


def block_macs(tokens, dim, width, hidden, attn_keep=1.0, mlp_keep=1.0):
    """One block; `*_keep` = 1 - skip probability (0 or 1 for hard decisions)."""
    return attn_keep * attention_macs(tokens, dim, width) + mlp_keep * mlp_macs(tokens, dim, hidden)


def shape_macs(tokens: int, shape: BlockShape) -> int:
    """One block's MACs from its hard shape."""
    return block_macs(tokens, shape.dim, shape.attn_width, shape.hidden, int(shape.runs_attn), int(shape.runs_mlp))


def patch_embed_macs(grid: tuple[int, int], patch: tuple[int, int], in_chans: int, dim: int) -> int:
    """A strided conv with kernel = stride = patch: one patch x channels -> dim product per grid cell."""
    return grid[0] * grid[1] * patch[0] * patch[1] * in_chans * dim


def linear_macs(in_features: int, out_features: int, tokens: int = 1) -> int:
    """A linear layer applied to `tokens` vectors (a classifier head reads one)."""
    return tokens * in_features * out_features


@dataclass(frozen=True)
class BlockParams:
    """What a block's parameter count needs beyond its shape: which layers carry a bias, and what each half
    holds that does not shrink (its LayerNorm and layer scale). Fields may be [L] tensors, one entry a block."""

    qkv_bias: int
    proj_bias: int
    fc1_bias: int
    fc2_bias: int
    attn_fixed: int
    mlp_fixed: int


def attention_params(dim, width, p: BlockParams):
    """qkv (3W x D weights, 3W biases) + proj (D x W weights, D biases) + the half's norm and layer scale."""
    return 3 * width * (dim + p.qkv_bias) + width * dim + dim * p.proj_bias + p.attn_fixed


def mlp_params(dim, hidden, p: BlockParams):
    """fc1 (M x D weights, M biases) + fc2 (D x M weights, D biases) + the half's norm and layer scale."""
    return hidden * (dim + p.fc1_bias) + hidden * dim + dim * p.fc2_bias + p.mlp_fixed


def block_params(dim, width, hidden, p: BlockParams, attn_keep=1.0, mlp_keep=1.0):
    """One block's parameters; `*_keep` as in `block_macs`: a skipped half holds none."""
    return attn_keep * attention_params(dim, width, p) + mlp_keep * mlp_params(dim, hidden, p)


@dataclass(frozen=True)
class HalfTimes:
    """Seconds per batch of one block shape's halves on a grid of kept sizes (grids ascending, from 1 to full).

    `attn[i][j]`: the attention half with `heads[i]` heads of width `head_dims[j]`; `mlp[k]`: the MLP half
    with `hidden[k]` neurons. A skipped half costs nothing."""

    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    attn: tuple[tuple[float, ...], ...]
    hidden: tuple[int, ...]
    mlp: tuple[float, ...]


@dataclass(frozen=True)
class LatencyModel:
    """A model's measured latency: the fixed parts and each block's `HalfTimes`, in seconds per batch."""

    fixed: float
    blocks: tuple[HalfTimes, ...]

    def _grids(self, like: torch.Tensor, axis: str) -> torch.Tensor:
        """[L, G] one grid per block, padded past its end (flat values there) to a common length."""
        grids = [getattr(b, axis) for b in self.blocks]
        size = max(2, *(len(g) for g in grids))  # a grid of one size (a single head) still needs a segment
        return like.new_tensor([list(g) + [g[-1] + 1 + i for i in range(size - len(g))] for g in grids])

    def _values(self, like: torch.Tensor, axis: str) -> torch.Tensor:
        rows = [getattr(b, axis) for b in self.blocks]
        if axis == "mlp":
            size = max(2, *(len(r) for r in rows))
            return like.new_tensor([list(r) + [r[-1]] * (size - len(r)) for r in rows])
        h, d = max(2, *(len(r) for r in rows)), max(2, *(len(r[0]) for r in rows))
        padded = [[list(row) + [row[-1]] * (d - len(row)) for row in r] for r in rows]
        return like.new_tensor([r + [r[-1]] * (h - len(r)) for r in padded])

    def attention(self, heads: torch.Tensor, head_dim: torch.Tensor) -> torch.Tensor:
        """[L] seconds of each block's attention half at `heads` x `head_dim` kept, bilinear in both."""
        i, t = _segment(heads, self._grids(heads, "heads"))
        j, u = _segment(head_dim, self._grids(heads, "head_dims"))
        table, rows = self._values(heads, "attn"), torch.arange(len(self.blocks), device=heads.device)

        def corner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return table[rows, a, b]
        return ((1 - t) * ((1 - u) * corner(i - 1, j - 1) + u * corner(i - 1, j))
                + t * ((1 - u) * corner(i, j - 1) + u * corner(i, j)))

    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        """[L] seconds of each block's MLP half at `hidden` neurons kept, linear between grid points."""
        k, t = _segment(hidden, self._grids(hidden, "hidden"))
        table, rows = self._values(hidden, "mlp"), torch.arange(len(self.blocks), device=hidden.device)
        return (1 - t) * table[rows, k - 1] + t * table[rows, k]


def _segment(x: torch.Tensor, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the grid segment [k - 1, k] holding x (on a grid point: the segment below it, so the
    slope is what removing from there saves) and x's position t in it (differentiable in x)."""
    k = torch.searchsorted(grids, x.detach()[:, None].contiguous()).squeeze(1).clamp(1, grids.shape[1] - 1)
    lo, hi = grids.gather(1, (k - 1)[:, None]).squeeze(1), grids.gather(1, k[:, None]).squeeze(1)
    return k, (x - lo) / (hi - lo)


@dataclass
class Skeleton:
    """The sizes that fix a ViT's MACs and parameters: token count, group counts per block, and what lies
    outside the blocks.

    Groups per block: H heads, d dimensions per head, M neurons. `cost(removed, ...)` is the
    differentiable whole-model total of `resource` that the search optimises and the fit lands.
    """

    tokens: int
    dim: list[int]
    heads: list[int]
    head_dim: list[int]
    hidden: list[int]
    fixed: int  # MACs outside the blocks
    layout: list[BlockParams] = field(default_factory=list)  # per block, for `params`
    fixed_params: int = 0  # parameters outside the blocks
    resource: str = "macs"  # what `cost` and `ratio` measure: one of RESOURCES
    latency: LatencyModel | None = None  # the measured table, for `latency`

    @property
    def depth(self) -> int:
        return len(self.heads)

    def sizes(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """[L, 3] number of groups of each kind per block, on `like`'s device and dtype (float32 on CPU without it)."""
        rows = [[h, d, m] for h, d, m in zip(self.heads, self.head_dim, self.hidden)]
        return like.new_tensor(rows) if like is not None else torch.tensor(rows, dtype=torch.float)

    def macs(self, removed: torch.Tensor, attn_keep: torch.Tensor, mlp_keep: torch.Tensor) -> torch.Tensor:
        """MACs with `removed[l] = (heads, dims per head, neurons)` gone; tensors carry gradients.

        Everything is computed on `removed`'s device and dtype.
        """
        kept = self.sizes(removed) - removed
        width = kept[:, 0] * kept[:, 1]
        blocks = block_macs(self.tokens, removed.new_tensor(self.dim), width, kept[:, 2], attn_keep, mlp_keep)
        return self.fixed + blocks.sum()

    def params(self, removed: torch.Tensor, attn_keep: torch.Tensor, mlp_keep: torch.Tensor) -> torch.Tensor:
        """Parameters with `removed` gone, as `macs` (the layout's columns become [L] tensors)."""
        kept = self.sizes(removed) - removed
        layout = BlockParams(*removed.new_tensor([astuple(p) for p in self.layout]).reshape(-1, 6).unbind(1))
        blocks = block_params(removed.new_tensor(self.dim), kept[:, 0] * kept[:, 1], kept[:, 2], layout, attn_keep, mlp_keep)
        return self.fixed_params + blocks.sum()

    def seconds(self, removed: torch.Tensor, attn_keep: torch.Tensor, mlp_keep: torch.Tensor) -> torch.Tensor:
        """Predicted seconds per batch with `removed` gone, from the latency table, as `macs`."""
        kept = self.sizes(removed) - removed
        blocks = attn_keep * self.latency.attention(kept[:, 0], kept[:, 1]) + mlp_keep * self.latency.mlp(kept[:, 2])
        return self.latency.fixed + blocks.sum()

    def cost(self, removed: torch.Tensor, attn_keep: torch.Tensor, mlp_keep: torch.Tensor) -> torch.Tensor:
        """The total of `resource` with `removed` gone."""
        return {"macs": self.macs, "params": self.params, "latency": self.seconds}[self.resource](removed, attn_keep, mlp_keep)

    @property
    def fixed_cost(self) -> float:
        """What no removal or skip touches, in `resource`."""
        return self.latency.fixed if self.resource == "latency" else {"macs": self.fixed, "params": self.fixed_params}[self.resource]

    @cached_property
    def dense_cost(self) -> float:
        zeros, ones = torch.zeros(self.depth, 3, dtype=torch.float64), torch.ones(self.depth, dtype=torch.float64)
        return float(self.cost(zeros, ones, ones))

    def ratio(self, removed: torch.Tensor, attn_keep: torch.Tensor, mlp_keep: torch.Tensor) -> torch.Tensor:
        """R = cost / dense cost, in `resource`."""
        return self.cost(removed, attn_keep, mlp_keep) / self.dense_cost

    def group_costs(self) -> torch.Tensor:
        """[L, 3] float64: what removing the first head, dimension slot and neuron of each block saves in `resource`."""
        removed = torch.zeros(self.depth, 3, dtype=torch.float64, requires_grad=True)
        ones = torch.ones(self.depth, dtype=torch.float64)
        with torch.enable_grad():  # callers may run under no_grad (one-shot does)
            (grad,) = torch.autograd.grad(self.cost(removed, ones, ones), [removed])
        return -grad
