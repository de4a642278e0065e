"""ONNX export of a dense or slimmed ViT, checked against PyTorch with onnxruntime, and its throughput.

A slimmed uvc model is a plain network (narrower Linear layers, fewer blocks), so it exports like
any timm ViT. The export uses torch's TorchScript exporter (`dynamo=False`): it needs no package
beyond `onnx`, and it translates `F.scaled_dot_product_attention` (timm's fused attention and
`SlimAttention`, with its explicit softmax scale) into plain ONNX ops. The file is checked in
onnxruntime before it is renamed into place, so a file at `path` always matches the model.
onnx and onnxruntime are optional: `pip install 'uvc[onnx]'`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import adapter_for
from .engine import alternating_rates
from .errors import UVCError
from .io import atomic_write
from .preprocess import LABEL_NAMES, of_model

MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's limit for a single-file ONNX model


def _ort():
    try:  # optional dependency: only this module needs onnxruntime
        import onnxruntime
    except ImportError as e:
        raise UVCError("ONNX export and timing need onnxruntime: pip install 'uvc[onnx]'") from e
    return onnxruntime


def _session(path: str | os.PathLike, threads: int | None = None):
    """A CPU onnxruntime session; `threads` fixes intra-op parallelism (None: one per usable core)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _metadata(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, str]:
    """The ONNX file's metadata: what a user of the graph alone needs, the class names as transformers'
    `id2label` and the preprocessing as timm's data config (`pretrained_cfg`), each a JSON string."""
    saved = of_model(model, input_size) or {}
    names = saved.pop(LABEL_NAMES, None)
    metadata = {"pretrained_cfg": json.dumps(saved)} if saved.keys() - {"input_size"} else {}
    if names:
        metadata["id2label"] = json.dumps({str(i): name for i, name in enumerate(names)})
    return metadata


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int] | None = None,
                opset: int = 17, atol: float = 1e-4, overwrite: bool = False) -> dict:
    """Write `model` (float32, on the CPU) as ONNX: input "images" (batch, C, H, W), output "logits", batch dynamic.

    The exported graph is run in onnxruntime on random batches of 1 and 3 images and compared with
    PyTorch in eval mode; a difference above `atol` raises UVCError and leaves `path` untouched.
    An existing file at `path` is replaced only with `overwrite`.
    The model's class names and preprocessing, when it has them, go into the file's metadata (`_metadata`).
    Returns {"path", "max_abs_diff", "opset", "input_size"}.
    """
    path = Path(path)
    if path.is_dir():
        raise UVCError(f"--onnx {path} is a folder; pass the path of the .onnx file to write")
    if path.exists() and not overwrite:
        raise UVCError(f"{path} exists; pass --overwrite to replace it, or another --onnx path")
    if not path.parent.is_dir():
        raise UVCError(f"the folder of --onnx {path} does not exist; create {path.parent} first")
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        raise UVCError("export_onnx needs a float32 model on the CPU; call model.float().cpu() first")
    if sum(p.numel() for p in params) * 4 >= MAX_ONNX_BYTES:
        raise UVCError("the model's weights exceed ONNX's 2 GB single-file limit")
    if input_size is None:
        try:
            input_size = adapter_for(model).input_size(model)
        except UVCError as e:
            raise UVCError(f"cannot tell the input size of a {type(model).__name__}; pass input_size=(C, H, W)") from e
    input_size = tuple(int(v) for v in input_size)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, *input_size, generator=generator) for b in (1, 3)]
    was_training = model.training
    model.eval()
    result = {}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript), and
            # the tracer warns about timm's shape asserts; neither concerns a fixed-size ViT.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (inputs[0],), tmp, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        if metadata := _metadata(model, input_size):
            import onnx

            graph = onnx.load(tmp)
            onnx.helper.set_model_props(graph, metadata)
            onnx.save(graph, tmp)
        session = _session(tmp)
        diff = 0.0
        with torch.no_grad():
            for x in inputs:
                got = session.run(["logits"], {"images": x.numpy()})[0]
                diff = max(diff, float(np.abs(got - model(x).numpy()).max()))
        if not diff <= atol:
            raise UVCError(f"the ONNX model differs from PyTorch by {diff:.2e} (> {atol:.0e}); not written")
        result["max_abs_diff"] = diff

    try:
        atomic_write(path, write)
    finally:
        model.train(was_training)
    return {"path": str(path), "max_abs_diff": result["max_abs_diff"], "opset": opset, "input_size": list(input_size)}


def _timed(sessions: dict, input_size, batch: int, seconds: float, rounds: int) -> dict[str, dict]:
    """`engine.alternating_rates` over onnxruntime sessions, all fed the same random batch."""
    feed = {"images": np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)}
    runs = {name: (lambda s=session: s.run(None, feed)) for name, session in sessions.items()}
    return alternating_rates(runs, batch, rounds, seconds)


def onnx_throughput(path: str | os.PathLike, input_size: tuple[int, int, int], batch: int, seconds: float = 1.0,
                    rounds: int = 5, threads: int | None = None) -> dict:
    """Images/s of an ONNX model in onnxruntime on the CPU: median, min and max over `rounds` rounds of >= `seconds`."""
    threads = threads or _cores()
    rates = _timed({"model": _session(path, threads)}, input_size, batch, seconds, rounds)["model"]
    return {**rates, "batch": batch, "threads": threads}


def compare_throughput(dense_path: str | os.PathLike, slim_path: str | os.PathLike, input_size: tuple[int, int, int],
                       batch: int, seconds: float = 1.0, rounds: int = 5, threads: int | None = None) -> dict:
    """Dense vs slimmed ONNX images/s, timed round by round in alternation (dense, slimmed, dense, ...).

    Returns {"dense": {median, min, max, rounds}, "slimmed": {...}, "speedup_median", "batch", "threads"}.
    """
    threads = threads or _cores()
    sessions = {"dense": _session(dense_path, threads), "slimmed": _session(slim_path, threads)}
    rates = _timed(sessions, input_size, batch, seconds, rounds)
    dense, slimmed = rates["dense"], rates["slimmed"]
    return {"dense": dense, "slimmed": slimmed, "speedup_median": slimmed["median"] / dense["median"],
            "batch": batch, "threads": threads}
