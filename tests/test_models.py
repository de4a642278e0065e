"""Released weights: --pretrained fails fast without network, a DeiT-format .pth loads via --checkpoint."""
import os
import subprocess
import sys
import time

import timm
import torch

import pytest

from uvc.errors import UVCError
from uvc.models import load_model, save


def test_pretrained_without_network_fails_fast_and_names_the_fix(tmp_path):
    # An endpoint that refuses connections and an empty cache stand in for an offline machine on any
    # machine. huggingface_hub alone retries for about a minute (56 s measured) before giving up.
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), UVC_PROGRESS="0")
    env.pop("HF_HUB_OFFLINE", None)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "uvc", "compress", "--model", "deit_small_patch16_224", "--pretrained",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.time() - started
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not fetch pretrained weights for deit_small_patch16_224" in result.stderr
    assert "pass --checkpoint PATH" in result.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s to report that the network is unreachable"
    assert not (tmp_path / "out").exists()


def test_original_deit_checkpoint_loads(tmp_path):
    """DeiT's released .pth files hold {'model': state_dict} (plus optimizer and args in training checkpoints)."""
    torch.manual_seed(1)
    reference = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    torch.save({"model": reference.state_dict(), "epoch": 299}, path)
    loaded = load_model("deit_tiny_patch16_224", checkpoint=str(path), pretrained=True)  # the file wins, no download
    own = loaded.state_dict()
    assert own.keys() == reference.state_dict().keys()
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items())


def test_build_options_for_a_model_that_is_already_built_are_refused_not_ignored(tmp_path):
    net = load_model(None)
    save(net, tmp_path / "saved")
    for model in (net, None, str(tmp_path / "saved")):
        with pytest.raises(UVCError, match="img_size only apply when a timm model is built by name"):
            load_model(model, img_size=56)
    with pytest.raises(UVCError, match="checkpoint, pretrained only apply"):
        load_model(net, checkpoint="w.pth", pretrained=True)
    assert load_model(net) is net


def test_saved_model_carries_its_preprocessing(tmp_path):
    """arch.json keeps the preprocessing part of pretrained_cfg at the model's own size, and timm reads it back."""
    import json

    import uvc

    model = timm.create_model("vit_small_patch14_dinov2", img_size=28, depth=1, num_classes=3)
    assert model.pretrained_cfg["input_size"] == (3, 518, 518)  # timm keeps the released size
    save(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "arch.json").read_text())["pretrained_cfg"]
    assert set(saved) <= {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    expected = timm.data.resolve_data_config({"input_size": (3, 28, 28)}, model=model)
    assert timm.data.resolve_data_config(model=uvc.load(tmp_path / "m")) == expected
    bare = timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2)
    save(bare, tmp_path / "bare")  # a model without a pretrained_cfg saves none
    assert "pretrained_cfg" not in json.loads((tmp_path / "bare" / "arch.json").read_text())


def test_hugging_face_folder_brings_its_preprocessor_config(tmp_path):
    import json

    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'uvc[hf]')")
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, num_labels=3)
    transformers.DeiTForImageClassification(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 40, "width": 40}, "resample": 2, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25]}))
    cfg = timm.data.resolve_data_config(model=load_model(str(tmp_path)))
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.25, 0.25) and cfg["interpolation"] == "bilinear"
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 0.8
