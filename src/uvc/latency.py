"""Latency as a budget: a table of measured half-block times, cached per machine, and the check of a plan
against the time its slimmed model actually takes.

MACs miss what a narrow model still pays: LayerNorms and residual adds on the full-width stream,
attention at short token counts, the per-operation overhead. The table times them where the
model will run (device, dtype, batch, threads): each distinct block shape's attention half at a
grid of kept heads x head widths and its MLP half at a grid of widths, each half as a slimmed block
that runs that half alone (its norm, layer scale and residual add included: exactly what skipping
it saves), and the model with every block removed (patch embedding, final norm, head). Each half is
timed as a chain of that half slimmed out of consecutive blocks, each with its own weights, so that
weights stream through the caches as in the whole model (`_chain`). Every entry
is timed in the same alternating rounds (`engine.alternating_rates`) and its median kept; the times
are made increasing along each axis, so that timing noise never makes a narrower half look
slower (and rise at least a little with every step, `_increasing`). `resource.LatencyModel` interpolates them, piecewise linearly, for the search.

The table is cached as JSON in the output folder (`latency_table.json`) and reused with
`--latency-table FILE`; its key (device, dtype, batch, threads, torch version, the model's shapes)
must match the run's, and a table from elsewhere is checked field by field before it is used.

A table's sum is a prediction. `fit_measured` times the slimmed model itself against the dense one
and, where the two disagree by more than the rounds' spread, refits the plan at a budget rescaled
by target / measured (by at most a quarter each time, at most `REFITS` times).
"""
from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapters import adapter_for
from .budget import plan_ratio
from .engine import alternating_rates, compare_throughput, cpu_threads, inference_runner, model_dtype
from .errors import UVCError
from .io import atomic_write_text
from .models import param_count
from .plan import LayerPlan
from .resource import HalfTimes, LatencyModel, Skeleton
from .slim import slim, slim_block

log = logging.getLogger("uvc")
TABLE_FORMAT = "uvc-latency/1"
TABLE_FILE = "latency_table.json"  # the cache in a run's output folder
MAX_TABLE_BYTES = 4 << 20
MAX_GRID = 64
CHAIN_BYTES = 64 << 20  # a timed chain of halves holds at least this much weight (beyond the caches), or every block
REFITS = 2  # refits at a rescaled budget after the first fit's timing


@dataclass
class LatencyConfig:
    """How a latency budget is measured. The defaults build the bundled teacher's table in well under two
    minutes on a 2-core CPU; more rounds give a steadier table."""

    batch: int | None = None  # images per timed call; None: the run's throughput batch
    threads: int | None = None  # CPU threads while timing; None: torch's count as it is
    table: str | None = None  # a latency_table.json to reuse (its key must match this run's)
    rounds: int = 5  # alternating rounds over all the table's entries (the median is kept)
    seconds: float = 0.2  # per entry and round

    def validate(self) -> None:
        for name in ("batch", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UVCError(f"--latency-{name} must be a positive whole number, got {value}")
        if self.rounds < 1 or not self.seconds > 0:
            raise UVCError(f"--latency-rounds must be >= 1 and --latency-seconds > 0, got {self.rounds} and {self.seconds}")


def grid(size: int, points: int) -> list[int]:
    """About `points` kept sizes from 1 to `size`, evenly spaced (every size when there are fewer)."""
    return sorted({1, size, *(max(1, round(size * k / (points - 1))) for k in range(1, points - 1))})


def device_name(device: torch.device) -> str:
    """The processor a timing belongs to: the GPU's name, or the CPU's model name where Linux gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu {names[0] if names else platform.processor() or platform.machine()}"


def table_key(model: nn.Module, input_size, device: torch.device, batch: int, threads: int) -> dict:
    """What a table's times depend on: the machine, the numbers it computes in, and the model's shapes."""
    adapter = adapter_for(model)
    blocks = [slim_block(b, _half_plan(b, attn=True, mlp=True)).config() for b in adapter.blocks(model)]
    return {"device": device_name(device), "dtype": str(model_dtype(model)).removeprefix("torch."), "batch": batch,
            "threads": threads if device.type == "cpu" else None, "torch": torch.__version__,
            "model": {"type": type(model).__name__, "input_size": list(input_size),
                      "tokens": adapter.tokens(model, input_size), "params": param_count(model),
                      "blocks": [[c["dim"], c["heads"], c["head_dim"], c["hidden"]] for c in blocks]}}


def _half_plan(block: nn.Module, attn: bool, mlp: bool, heads: int | None = None, head_dim: int | None = None,
               hidden: int | None = None) -> LayerPlan:
    """The plan that keeps the first `heads` x `head_dim` of attention and `hidden` neurons (default: all)."""
    h, d = heads or block.attn.num_heads, head_dim or block.attn.head_dim
    return LayerPlan(heads=list(range(h)) if attn else [], dims=[list(range(d))] * h if attn else [],
                     neurons=list(range(hidden or block.mlp.fc1.out_features)) if mlp else [], attn=attn, mlp=mlp)


@torch.inference_mode()
def measure_table(model: nn.Module, input_size, device: torch.device, batch: int, threads: int | None = None,
                  rounds: int = 5, seconds: float = 0.2) -> dict:
    """The latency table of `model` (see the module docstring) as JSON-ready data, in seconds per batch."""
    started = time.perf_counter()
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    tokens, dtype = adapter.tokens(model, input_size), model_dtype(model)
    configs = [slim_block(b, _half_plan(b, True, True)).config() for b in blocks]
    shapes, index = [], []  # distinct block shapes, and each block's entry in them
    timed: dict[str, tuple[nn.Module, int, torch.Tensor]] = {}  # entry: (module, halves it chains, its input)
    with cpu_threads(threads) as used:
        key = table_key(model, input_size, device, batch, used)
        for l, config in enumerate(configs):
            if config in [s["config"] for s in shapes]:
                index.append([s["config"] for s in shapes].index(config))
                continue
            index.append(len(shapes))
            x = torch.randn(batch, tokens, config["dim"], device=device, dtype=dtype)
            entry = {"config": config, "sizes": key["model"]["blocks"][l], "heads": grid(config["heads"], 5),
                     "head_dims": grid(config["head_dim"], 5), "hidden": grid(config["hidden"], 7)}
            alike = [b for b, c in zip(blocks, configs) if c == config]
            for h in entry["heads"]:
                for d in entry["head_dims"]:
                    timed[f"{len(shapes)} attn {h} {d}"] = (*_chain(alike, dict(attn=True, mlp=False, heads=h, head_dim=d)), x)
            for m in entry["hidden"]:
                timed[f"{len(shapes)} mlp {m}"] = (*_chain(alike, dict(attn=False, mlp=True, hidden=m)), x)
            shapes.append(entry)
        images = torch.randn(batch, *input_size, device=device, dtype=dtype)
        skipped = [LayerPlan([], [], [], attn=False, mlp=False)] * len(blocks)
        timed["fixed"] = (slim(model, skipped), 1, images)
        timed["dense"] = (model, 1, images)
        log.info("building the latency table: %d entries (%d block shape%s), %d alternating rounds of %.2f s each on %s, "
                 "batch %d, %s threads", len(timed), len(shapes), "" if len(shapes) == 1 else "s", rounds, seconds,
                 key["device"], batch, used)
        rates = alternating_rates({name: inference_runner(module, inputs, device) for name, (module, _, inputs) in timed.items()},
                                  batch, rounds, seconds)
    time_of = {name: batch / r["median"] / timed[name][1] for name, r in rates.items()}
    for s, entry in enumerate(shapes):
        attn = [[time_of[f"{s} attn {h} {d}"] for d in entry["head_dims"]] for h in entry["heads"]]
        attn = _increasing(torch.tensor(attn, dtype=torch.float64), entry["heads"], dim=0)
        entry["attn"] = _increasing(attn, entry["head_dims"], dim=1).tolist()
        mlp = torch.tensor([time_of[f"{s} mlp {m}"] for m in entry["hidden"]], dtype=torch.float64)
        entry["mlp"] = _increasing(mlp, entry["hidden"], dim=0).tolist()
        del entry["config"]
    table = {"format": TABLE_FORMAT, "key": key, "fixed": time_of["fixed"], "shapes": shapes, "blocks": index,
             "dense_measured": time_of["dense"], "rounds": rounds, "seconds_per_round": seconds}
    predicted = float(predicted_dense_seconds(table))
    table["build_seconds"] = time.perf_counter() - started
    log.info("latency table built in %.1f s: the dense model's predicted time is %.3g s per batch of %d, measured %.3g s "
             "(%.2f of it)", table["build_seconds"], predicted, batch, table["dense_measured"], predicted / table["dense_measured"])
    return table


def _chain(alike: list[nn.Module], half: dict) -> tuple[nn.Module, int]:
    """(the half `half` of `_half_plan` slimmed out of consecutive blocks of one shape, how many): timed as
    a chain, each with its own weights, so that the weights stream through the caches as they do in the
    whole model (one half timed alone keeps its weights in cache, and at batch 1 narrowing it then looks
    to save less than it does in the model). The chain stops once its weights exceed `CHAIN_BYTES`, which bounds the table's memory."""
    chain, size = [], 0
    for block in alike:
        chain.append(slim_block(block, _half_plan(block, **half)))
        size += sum(p.numel() * p.element_size() for p in chain[-1].parameters())
        if size >= CHAIN_BYTES:
            break
    return nn.Sequential(*chain), len(chain)


def _increasing(times: torch.Tensor, sizes: list[int], dim: int) -> torch.Tensor:
    """`times` made increasing along `dim` over the grid `sizes`: a running maximum (noise never makes a narrower
    half slower), then at least a thousandth of the mean slope per step, so that every removal saves a little
    and a fit can cross a stretch that timing found flat."""
    times = times.cummax(dim=dim).values
    if len(sizes) < 2:
        return times
    grid = torch.tensor(sizes, dtype=times.dtype)
    first, last = times.select(dim, 0), times.select(dim, -1)
    floor = 1e-3 * ((last - first) / (grid[-1] - grid[0])).clamp(min=1e-9 * last.abs().max().item())
    steps = [times.select(dim, 0)]
    for k in range(1, len(sizes)):
        steps.append(torch.maximum(times.select(dim, k), steps[-1] + floor * (grid[k] - grid[k - 1])))
    return torch.stack(steps, dim=dim)


def latency_model(table: dict) -> LatencyModel:
    """The interpolating model of a (checked) table, one `HalfTimes` per block."""
    halves = [HalfTimes(heads=tuple(s["heads"]), head_dims=tuple(s["head_dims"]), attn=tuple(map(tuple, s["attn"])),
                        hidden=tuple(s["hidden"]), mlp=tuple(s["mlp"])) for s in table["shapes"]]
    return LatencyModel(fixed=table["fixed"], blocks=tuple(halves[i] for i in table["blocks"]))


def predicted_dense_seconds(table: dict) -> float:
    """The table's prediction for the dense model: fixed parts plus every block's two halves at full size."""
    return table["fixed"] + sum(table["shapes"][i]["attn"][-1][-1] + table["shapes"][i]["mlp"][-1] for i in table["blocks"])


def load_table(path: str | Path, key: dict) -> dict:
    """A table from a file (untrusted JSON), checked field by field and against the run's `key`; one-line errors."""
    path = Path(path)
    fix = "rebuild it: leave --latency-table out (the run measures and caches its own)"
    try:
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise UVCError(f"latency table {path} is larger than {MAX_TABLE_BYTES >> 20} MB, which no table is; {fix}")
        table = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UVCError(f"latency table {path} cannot be read as JSON ({type(e).__name__}); {fix}") from e
    problem = _table_problem(table, key)
    if problem:
        raise UVCError(f"latency table {path}: {problem}; {fix}")
    return table


def _table_problem(table, key: dict) -> str | None:
    """What is wrong with a table for this key, in words, or None."""
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        return f"not a uvc latency table (format {TABLE_FORMAT!r})"
    theirs = table.get("key")
    if not isinstance(theirs, dict):
        return "it has no key saying where it was measured"
    for field, ours in key.items():
        if theirs.get(field) != ours:
            what = "the model's shapes" if field == "model" else f"{field} {theirs.get(field)!r}"
            return f"it was measured for {what}, this run needs {'other shapes' if field == 'model' else repr(ours)}"
    if not _time(table.get("fixed")) or not _time(table.get("dense_measured")):
        return "its fixed or dense time is not a finite number >= 0"
    shapes, blocks = table.get("shapes"), table.get("blocks")
    if not isinstance(shapes, list) or not 0 < len(shapes) <= len(key["model"]["blocks"]):
        return "its shapes are not a list of one entry per distinct block shape"
    if not isinstance(blocks, list) or len(blocks) != len(key["model"]["blocks"]):
        return f"its blocks do not list the model's {len(key['model']['blocks'])} blocks"
    for l, i in enumerate(blocks):
        if type(i) is not int or not 0 <= i < len(shapes) or not isinstance(shapes[i], dict):
            return f"block {l} points at no shape"
        if shapes[i].get("sizes") != key["model"]["blocks"][l]:
            return f"block {l}'s shape differs from the model's"
    for s, shape in enumerate(shapes):
        _, heads, head_dim, hidden = shape.get("sizes") if isinstance(shape, dict) and isinstance(shape.get("sizes"), list) \
            and len(shape["sizes"]) == 4 else (0, 0, 0, 0)
        for name, size in (("heads", heads), ("head_dims", head_dim), ("hidden", hidden)):
            g = shape.get(name) if isinstance(shape, dict) else None
            if not (isinstance(g, list) and 2 <= len(g) <= MAX_GRID or g == [1] == [size]) or \
                    any(type(v) is not int for v in g) or g[0] != 1 or g[-1] != size or any(a >= b for a, b in zip(g, g[1:])):
                return f"shape {s}'s {name} grid is not ascending whole numbers from 1 to {size}"
        attn, mlp = shape.get("attn"), shape.get("mlp")
        if not (isinstance(attn, list) and len(attn) == len(shape["heads"]) and all(
                isinstance(row, list) and len(row) == len(shape["head_dims"]) and all(map(_time, row)) for row in attn)):
            return f"shape {s}'s attention times are not a heads x head widths grid of finite times >= 0"
        if not (isinstance(mlp, list) and len(mlp) == len(shape["hidden"]) and all(map(_time, mlp))):
            return f"shape {s}'s MLP times are not one finite time >= 0 per width"
    return None


def _time(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def table_for(model: nn.Module, input_size, device: torch.device, cfg: LatencyConfig, batch: int,
              out: Path | None) -> dict:
    """The run's table: `cfg.table` if given (checked), else the cache in `out` if its key matches, else measured
    now (and cached in `out`)."""
    with cpu_threads(cfg.threads) as threads:
        key = table_key(model, input_size, device, cfg.batch or batch, threads)
    if cfg.table:
        table = load_table(cfg.table, key)
        log.info("latency table from %s (measured on %s)", cfg.table, key["device"])
        return table
    cached = out / TABLE_FILE if out is not None else None
    if cached is not None and cached.is_file():
        try:
            table = load_table(cached, key)
            log.info("latency table reused from %s", cached)
            return table
        except UVCError as e:
            log.info("not reusing %s (%s)", cached, str(e).split(";")[0])
    table = measure_table(model, input_size, device, cfg.batch or batch, cfg.threads, cfg.rounds, cfg.seconds)
    if cached is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, json.dumps(table, indent=1))
    return table


def measured_ratio(dense: nn.Module, slimmed: nn.Module, input_size, device: torch.device, batch: int,
                   threads: int | None = None, rounds: int = 8, seconds: float = 1.0) -> dict:
    """The slimmed model's time as a fraction of the dense one's, per alternating round: median, min and max."""
    speed = compare_throughput({"dense": dense, "slimmed": slimmed}, input_size, batch, device, rounds, seconds, threads)
    ratios = [d / s for d, s in zip(speed["dense"]["rounds"], speed["slimmed"]["rounds"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios,
            "speed": speed}


def fit_measured(plan_at: Callable[[float], list[LayerPlan]], skel: Skeleton, budget: float,
                 measure: Callable[[list[LayerPlan]], dict], tolerance: float = 0.01) -> tuple[list[LayerPlan], dict]:
    """The plan `plan_at(budget)`, refitted at budget * target / measured while the slimmed model's measured
    ratio (`measure(plan)`, a `measured_ratio`) lies outside [budget - tolerance, budget] by more than half
    its rounds' range (at most REFITS times; then the fit whose timing came closest). Returns the plan and
    what each fit predicted and measured."""
    fitted, fits, plans = budget, [], []
    for attempt in range(REFITS + 1):
        try:
            plan = plan_at(fitted)
        except UVCError:
            if not fits:
                raise
            log.info("latency fit: budget %.4f is out of reach; keeping the previous fits", fitted)
            break
        plans.append(plan)
        measured = measure(plan)
        spread = (measured["max"] - measured["min"]) / 2
        fits.append({"fitted_budget": fitted, "predicted": plan_ratio(skel, plan), "measured": measured["median"],
                     "measured_min": measured["min"], "measured_max": measured["max"]})
        log.info("latency fit %d: table predicts %.4f, measured %.4f (rounds %.4f-%.4f) against budget %.2f",
                 attempt + 1, fits[-1]["predicted"], measured["median"], measured["min"], measured["max"], budget)
        fits[-1]["miss"] = max(budget - tolerance - spread - measured["median"], measured["median"] - budget - spread, 0.0)
        if fits[-1]["miss"] == 0 or attempt == REFITS:
            break
        if not 2 / 3 <= measured["median"] / fits[-1]["predicted"] <= 1.5:
            log.warning("latency fit: the slimmed model measures %.2f of the dense one where the table predicts %.2f: the "
                        "timings disagree (a loaded machine?); rebuild the table on a quiet machine", measured["median"],
                        fits[-1]["predicted"])
        # A rescale by at most a quarter per refit: a timing disturbed by other load cannot drag the plan far.
        fitted = min(1.0, fitted * min(max((budget - tolerance / 2) / measured["median"], 0.75), 1.25))
    # Timings are noisy: the fit whose timing came closest to the window, its plan as it was made (a search's
    # final plan at the same budget need not repeat: the fit moves its state).
    best = min(range(len(fits)), key=lambda i: fits[i]["miss"])
    kept, best = plans[best], fits[best]
    return kept, {"fits": fits, **{k: best[k] for k in ("fitted_budget", "predicted", "measured", "measured_min",
                                                        "measured_max")}}
