"""ONNX export of dense and slimmed ViTs, checked in onnxruntime, and the throughput comparison."""
import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import uvc

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'uvc[onnx]')")

from uvc.export import compare_throughput, export_onnx, onnx_throughput  # noqa: E402

ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2)


def tiny(cls=VisionTransformer, seed=0):
    torch.manual_seed(seed)
    return cls(**ARGS).eval()


def plan_half(model):
    """Keep head 1 at half its width, half the neurons; skip the MLP of the last block."""
    plans = []
    for i, block in enumerate(model.blocks):
        head_dim, hidden = block.attn.head_dim, block.mlp.fc1.out_features
        plans.append(uvc.LayerPlan(heads=[1], dims=[list(range(0, head_dim, 2))], neurons=list(range(0, hidden, 2)),
                                   mlp=i < len(model.blocks) - 1))
    return plans


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


@pytest.mark.parametrize("kind", ["dense", "slimmed", "distilled"])
def test_export_matches_pytorch_with_a_dynamic_batch(tmp_path, kind):
    model = tiny(VisionTransformerDistilled if kind == "distilled" else VisionTransformer)
    if kind == "slimmed":
        model = uvc.slim(model, plan_half(model))
    path = tmp_path / f"{kind}.onnx"
    info = export_onnx(model, path)
    assert info["path"] == str(path) and info["opset"] == 17 and info["input_size"] == [1, 28, 28]
    assert info["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 1, 28, 28)
    got = run_onnx(path, x)
    assert got.shape == (5, 10)
    with torch.no_grad():
        assert (got - model(x)).abs().max().item() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_a_failed_check_leaves_no_file_and_the_mode_is_restored(tmp_path):
    model = tiny().train()
    with pytest.raises(uvc.UVCError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", atol=-1.0)  # no difference passes a negative tolerance
    assert list(tmp_path.iterdir()) == [] and model.training


def test_input_size_is_taken_or_demanded(tmp_path):
    info = export_onnx(tiny(), tmp_path / "m.onnx", input_size=(1, 28, 28), opset=18)
    assert info["opset"] == 18 and info["max_abs_diff"] <= 1e-4
    with pytest.raises(uvc.UVCError, match="input_size"):
        export_onnx(torch.nn.Linear(4, 2), tmp_path / "linear.onnx")
    with pytest.raises(uvc.UVCError, match="float32"):
        export_onnx(tiny().half(), tmp_path / "half.onnx")


def test_throughput_comparison_returns_positive_rates(tmp_path):
    model = tiny()
    export_onnx(model, tmp_path / "dense.onnx")
    export_onnx(uvc.slim(model, plan_half(model)), tmp_path / "slim.onnx")
    result = compare_throughput(tmp_path / "dense.onnx", tmp_path / "slim.onnx", (1, 28, 28), batch=4,
                                seconds=0.05, rounds=2, threads=1)
    for name in ("dense", "slimmed"):
        stats = result[name]
        assert len(stats["rounds"]) == 2 and 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert result["speedup_median"] > 0 and result["threads"] == 1 and result["batch"] == 4
    single = onnx_throughput(tmp_path / "dense.onnx", (1, 28, 28), batch=2, seconds=0.05, rounds=2, threads=1)
    assert single["median"] > 0 and single["threads"] == 1
