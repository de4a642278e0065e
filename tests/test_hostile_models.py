"""Model folders and data a user points uvc at, damaged or hostile: each is refused in one line
before anything is built, and nothing in them runs (issue 27, items 8 and 9)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.budget import uniform_plan
from uvc.data import DataConfig, build_data

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "UVC_PROGRESS": "0"}


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=2,
                             num_heads=2).eval()


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "model"
    uvc.save(tiny_vit(), folder)
    return folder


def edit_arch(folder: Path, change) -> None:
    arch = json.loads((folder / "arch.json").read_text())
    change(arch)
    (folder / "arch.json").write_text(json.dumps(arch))


def kwargs_set(**values):
    return lambda arch: arch["model"]["kwargs"].update(values)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("change, message", [
    (kwargs_set(depth=10**9), r"model\.kwargs\.depth is 1000000000, outside \[0, 1024\]"),
    (kwargs_set(depth=7), r"model\.kwargs\.depth says 7 blocks, but .*model\.safetensors holds blocks 0-1"),
    (kwargs_set(embed_dim="32"), r"model\.kwargs\.embed_dim is a string, not an integer"),
    (kwargs_set(num_classes=-1), r"model\.kwargs\.num_classes is -1, outside"),
    (kwargs_set(in_chans=True), r"model\.kwargs\.in_chans is true/false, not an integer"),
    (kwargs_set(mlp_ratio=float("nan")), r"model\.kwargs\.mlp_ratio is nan, outside"),
    (kwargs_set(img_size=[28]), r"model\.kwargs\.img_size is a list of 1, not a list of two integers"),
    (kwargs_set(embed_dim=64, num_heads=2), r"model\.kwargs\.embed_dim gives patch_embed\.proj\.weight size 64"),
    (kwargs_set(num_heads=3), r"model\.kwargs\.num_heads \(3\) does not divide model\.kwargs\.embed_dim \(32\)"),
    (kwargs_set(block_fn="os.system"), r"unknown field model\.kwargs\.block_fn"),
    (lambda arch: arch.update(model="VisionTransformer"), r"field model is a string, not a JSON object"),
    (lambda arch: arch["model"].update({"class": "Evil"}), r"field model\.class is \"Evil\", not one of"),
    (lambda arch: arch["model"].update(adapter=["timm-vit"]), r"field model\.adapter is \[\"timm-vit\"\]"),
    (lambda arch: arch.update(layers="all"), r"field layers is a string, not a list of objects"),
    (lambda arch: arch.update(extra=1), r"unknown field extra"),
])
def test_hostile_arch_json_is_one_line_before_building(saved, change, message):
    edit_arch(saved, change)
    with pytest.raises(uvc.UVCError, match=message) as error:
        uvc.load(saved)
    assert "arch.json" in one_line(error) and "save the model again" in str(error.value)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not JSON text"),
    (b"[" * 100_000, "not JSON text"),
    (b"[1, 2]", "a list where a JSON object belongs"),
    (b'"model"', "a string where a JSON object belongs"),
])
def test_arch_json_that_is_not_an_object(saved, content, message):
    (saved / "arch.json").write_bytes(content)
    with pytest.raises(uvc.UVCError, match=message) as error:
        uvc.load(saved)
    one_line(error)


def test_slimmed_layers_are_checked_against_the_weights(tmp_path):
    model = tiny_vit()
    uvc.save(uvc.slim(model, uniform_plan(model, 0.5)), tmp_path)
    assert uvc.macs(uvc.load(tmp_path)) < uvc.macs(model)  # valid: loads, weights_sha256 accepted
    edit_arch(tmp_path, lambda arch: arch["layers"][1].update(heads=2000))
    with pytest.raises(uvc.UVCError, match=r"layers\[1\]\.heads x head_dim gives blocks\.1\.attn\.qkv\.weight"):
        uvc.load(tmp_path)
    edit_arch(tmp_path, lambda arch: arch["layers"].pop())
    with pytest.raises(uvc.UVCError, match=r"field layers says 1 blocks, but .* holds blocks 0-1"):
        uvc.load(tmp_path)


def uvc_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uvc", *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_cli_refuses_hostile_folders_in_one_line(saved, tmp_path):
    assert uvc_cli("info", str(saved)).returncode == 0
    (saved / "arch.json").write_bytes(b"\x00\x01\xff garbage")
    edit_hf = tmp_path / "hf"
    edit_hf.mkdir()
    (edit_hf / "config.json").write_text(json.dumps({"model_type": "vit", "num_hidden_layers": 10**12}))
    for args in (["info", str(saved)], ["compress", "--model", str(edit_hf), "--out", str(tmp_path / "out")]):
        done = uvc_cli(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


# ---- Hugging Face folders ------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=7, num_channels=1, num_labels=3)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))


class RunsCode:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hf_folder_loads_and_a_pickle_runs_no_code(hf_folder, tmp_path):
    reference = uvc.load_model(str(hf_folder))
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTForImageClassification.from_pretrained(hf_folder)
    (hf_folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), hf_folder / "pytorch_model.bin")  # a plain weights pickle still loads
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(uvc.load_model(str(hf_folder))(x), reference(x), atol=1e-5)
    marker = tmp_path / "code-ran"
    with open(hf_folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"vit.embeddings.cls_token": RunsCode(marker)}, f)
    with pytest.raises(uvc.UVCError, match="pytorch_model.bin is not a readable PyTorch checkpoint") as error:
        uvc.load_model(str(hf_folder))
    assert "weights_only" not in one_line(error) and not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:3000]),
     r"model\.safetensors is corrupt or not a safetensors file"),
    (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00binary"), r"config\.json is corrupt: not JSON text"),
    (lambda f: (f / "config.json").write_text("[]"), r"config\.json is corrupt: a list where a JSON object belongs"),
    (lambda f: edit_config(f, model_type="swin"), r"'swin' model; uvc converts model types vit, deit, dinov2"),
    (lambda f: edit_config(f, num_hidden_layers=10**9), r"field num_hidden_layers is 1000000000, outside"),
    (lambda f: edit_config(f, num_hidden_layers=5), r"field num_hidden_layers says 5 blocks, but .* holds blocks 0-1"),
    (lambda f: edit_config(f, hidden_size=48), r"field hidden_size gives .*patch_embeddings.projection.weight size 48"),
    (lambda f: edit_config(f, image_size="28"), r"field image_size is a string, not an integer or a list"),
    (lambda f: edit_config(f, num_labels=10**9), r"field num_labels is 1000000000, outside"),
    (lambda f: edit_config(f, architectures=["DeiTForImageClassification"]), r"holds a 'vit' DeiTForImageClassification"),
])
def test_hostile_hf_folder_is_one_line(hf_folder, damage, message):
    damage(hf_folder)
    with pytest.raises(uvc.UVCError, match=message) as error:
        uvc.load_model(str(hf_folder))
    one_line(error)


# ---- advice that fits the situation (item 9) -----------------------------------------------------
def write_idx(path: Path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 8, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_a_broken_data_root_is_named_not_debian(tmp_path):
    for prefix, n in (("train", 40), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,)))
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])  # a cut-off download
    with pytest.raises(uvc.UVCError, match=f"replace t10k-images-idx3-ubyte.gz in {tmp_path}") as error:
        build_data(DataConfig(root=str(tmp_path), batch_size=8))
    assert "reinstall" not in one_line(error)
    write_idx(images, torch.randint(0, 255, (9, 28, 28)))  # one image short of its labels
    with pytest.raises(uvc.UVCError, match="not 28x28 images with one label of 0-9 each"):
        build_data(DataConfig(root=str(tmp_path), batch_size=8))
    images.unlink()
    with pytest.raises(uvc.UVCError, match=f"not found in {tmp_path} \\(the --data-root folder; missing t10k-images"):
        build_data(DataConfig(root=str(tmp_path), batch_size=8))


def test_similar_names_come_from_the_family_typed():
    with pytest.raises(uvc.UVCError, match="Similar names: deit_tiny_patch16_224") as error:
        uvc.load_model("deit_tiny_patch16_225")
    names = one_line(error).split("Similar names: ")[1].split(", ")
    assert all(name.startswith("deit") for name in names)


@pytest.mark.parametrize("cfg, message", [
    ({"mean": [0.5], "std": [0.0]}, r"the model's std \[0\.0\] is not usable"),
    ({"mean": [float("nan")], "std": [0.5]}, r"the model's mean \[nan\] is not usable"),
    ({"interpolation": "lanczos9"}, r"interpolation 'lanczos9' is not one of"),
    ({"crop_pct": 7}, r"crop_pct 7 is outside \(0, 1\]"),
])
def test_hostile_preprocessing_in_a_saved_model_is_one_line_naming_the_override(saved, cfg, message):
    edit_arch(saved, lambda arch: arch.update(pretrained_cfg={"input_size": [1, 28, 28], **cfg}))
    model = uvc.load_model(str(saved))  # the weights are fine; the preprocessing is refused where it is used
    with pytest.raises(uvc.UVCError, match=message) as error:
        build_data(DataConfig(batch_size=8, train_limit=16, val_limit=16, test_limit=16),
                   input_size=(1, 32, 32), pretrained_cfg=model.pretrained_cfg)  # not 28x28: Fashion-MNIST is resized
    assert "--mean, --std, --interpolation or --crop-pct" in one_line(error)
