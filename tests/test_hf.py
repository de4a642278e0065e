"""Hugging Face transformers ViT / DeiT / DINOv2 models as timm models: same outputs, and uvc compresses them."""
import ast
import copy
import json
import re
from pathlib import Path

import pytest
import torch

import uvc

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'uvc[hf]')")

from uvc.hf import VisionTransformerClsAvg, is_hf_folder, load_hf_folder, timm_state_dict, to_timm  # noqa: E402

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
           patch_size=8, num_labels=5)
DINO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=7,
            num_labels=5, layerscale_value=0.5)
CASES = {  # id -> (transformers class, config class, config)
    "ViTModel": ("ViTModel", "ViTConfig", VIT),
    "ViTForImageClassification": ("ViTForImageClassification", "ViTConfig", VIT),
    "ViT-tanh-nobias-rect-grey": ("ViTForImageClassification", "ViTConfig",
                                  {**VIT, "hidden_act": "gelu_new", "qkv_bias": False, "image_size": [32, 24],
                                   "num_channels": 1}),
    "DeiTModel": ("DeiTModel", "DeiTConfig", VIT),
    "DeiTForImageClassification": ("DeiTForImageClassification", "DeiTConfig", VIT),
    "DeiTForImageClassificationWithTeacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT),
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", DINO),
    "Dinov2ForImageClassification": ("Dinov2ForImageClassification", "Dinov2Config", DINO),
}


def hf_model(case: str, seed: int = 0):
    """A tiny random transformers model; every parameter is perturbed so that no two tensors are alike
    (HF zero-initialises the tokens and biases, and a swapped pair of zeros would go unnoticed)."""
    cls, config_cls, config = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def images(model, batch=3):
    c = model.config
    h, w = c.image_size if isinstance(c.image_size, (list, tuple)) else (c.image_size, c.image_size)
    return torch.randn(batch, c.num_channels, h, w, generator=torch.Generator().manual_seed(1))


def hf_output(model, x):
    """What the timm model's forward() is compared with: logits, or the class token for bare backbones."""
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]


def run(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("case", CASES)
def test_timm_model_reproduces_the_transformers_model(case):
    hf = hf_model(case)
    timm_model = to_timm(hf)
    x = images(hf)
    reference = hf_output(hf, x)
    assert (run(timm_model, x) - reference).abs().max().item() <= 1e-4
    expected_type = {"DeiTForImageClassificationWithTeacher": "VisionTransformerDistilled",
                     "Dinov2ForImageClassification": "VisionTransformerClsAvg"}.get(case, "VisionTransformer")
    assert type(timm_model).__name__ == expected_type
    if "For" not in CASES[case][0]:  # backbones: every token matches, not only the class token
        with torch.no_grad():
            full = hf(x).last_hidden_state
            assert (timm_model.forward_features(x) - full).abs().max().item() <= 1e-4


def test_both_transformers_key_layouts_map_alike():
    """transformers 4.x names (encoder.layer.i.attention.attention.query, intermediate.dense, ...) and 5.x names
    (layers.i.attention.q_proj, mlp.fc1, ...) give the same timm state dict."""
    state = hf_model("ViTForImageClassification").state_dict()
    legacy = [(r"\.layers\.(\d+)\.", r".encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
              (r"attention\.k_proj", "attention.attention.key"), (r"attention\.v_proj", "attention.attention.value"),
              (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
              (r"mlp\.fc2", "output.dense")]

    def old_name(key):
        for pattern, repl in legacy:
            key = re.sub(pattern, repl, key)
        return key

    new, old = timm_state_dict(state, "vit."), timm_state_dict({old_name(k): v for k, v in state.items()}, "vit.")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    with pytest.raises(uvc.UVCError, match="no timm counterpart"):
        timm_state_dict({**state, "vit.layers.0.attention.rel_pos": torch.zeros(1)}, "vit.")


@pytest.mark.parametrize("case", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "Dinov2ForImageClassification", "Dinov2Model"])
def test_save_pretrained_folder_loads(tmp_path, case):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    assert is_hf_folder(tmp_path)
    x = images(hf)
    assert (run(load_hf_folder(tmp_path), x) - run(to_timm(hf), x)).abs().max().item() <= 1e-6


def test_folders_that_are_not_supported(tmp_path):
    assert not is_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin", "architectures": ["SwinModel"]}))
    assert is_hf_folder(tmp_path)  # a save_pretrained folder: load_hf_folder names what it cannot convert
    with pytest.raises(uvc.UVCError, match="'swin'.*vit, deit, dinov2"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForMaskedImageModeling"]}))
    with pytest.raises(uvc.UVCError, match="ViTForMaskedImageModeling"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("case, change, message", [
    ("ViTForImageClassification", {"hidden_act": "quick_gelu"}, "quick_gelu"),
    ("Dinov2Model", {"use_swiglu_ffn": True}, "SwiGLU"),
])
def test_unsupported_features_are_named(case, change, message):
    cls, config_cls, config = CASES[case]
    hf = getattr(transformers, cls)(getattr(transformers, config_cls)(**{**config, **change}))
    with pytest.raises(uvc.UVCError, match=message):
        to_timm(hf)


def half_plan(model):
    """Keep head 1 of 2 at half its width and every other MLP neuron, in every block."""
    plans = []
    for block in model.blocks:
        head_dim, hidden = block.attn.head_dim, block.mlp.fc1.out_features
        plans.append(uvc.LayerPlan(heads=[1], dims=[list(range(0, head_dim, 2))], neurons=list(range(0, hidden, 2))))
    return plans


@pytest.mark.parametrize("case", CASES)
def test_converted_model_compresses(case):
    model = to_timm(hf_model(case))
    plan = half_plan(model)
    gated = uvc.make_compressible(copy.deepcopy(model))
    uvc.set_plan(gated, plan)
    slimmed = uvc.slim(model, plan)
    x = images(hf_model(case))
    assert (run(slimmed, x) - run(gated, x)).abs().max().item() <= 1e-5
    assert uvc.macs(slimmed) < 0.6 * uvc.macs(model)


def test_slimmed_vit_saves_and_loads(tmp_path):
    model = to_timm(hf_model("ViTForImageClassification"))
    slimmed = uvc.slim(model, half_plan(model))
    uvc.save(slimmed, tmp_path)
    x = images(hf_model("ViTForImageClassification"))
    assert (run(uvc.load(tmp_path), x) - run(slimmed, x)).abs().max().item() <= 1e-5


def test_dense_converted_model_keeps_norm_eps_and_gelu_through_save(tmp_path):
    model = to_timm(hf_model("ViT-tanh-nobias-rect-grey"))
    uvc.save(model, tmp_path)
    loaded = uvc.load(tmp_path)
    assert loaded.norm.eps == model.norm.eps and loaded.blocks[0].norm1.eps == model.blocks[0].norm1.eps
    assert loaded.blocks[0].mlp.act.approximate == "tanh"


def test_cls_avg_head_needs_no_transformers():
    model = VisionTransformerClsAvg(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=1,
                                    num_heads=2).eval()
    assert model.head.in_features == 64 and run(model, torch.randn(2, 1, 28, 28)).shape == (2, 3)
    model.reset_classifier(0)
    assert run(model, torch.randn(2, 1, 28, 28)).shape == (2, 64)
    # the optional dependencies are imported inside functions only
    for name in ("hf.py", "export.py"):
        tree = ast.parse((Path(uvc.__file__).parent / name).read_text())
        top = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
        top += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module]
        assert not any(m.split(".")[0] in ("transformers", "onnxruntime", "onnx") for m in top), (name, top)


def test_id2label_is_carried_into_the_result_and_back_out(tmp_path, capsys):
    from uvc.cli import main
    from uvc.export import export_onnx

    cls, config_cls, config = CASES["ViTForImageClassification"]
    names = ["cat", "dog", "eel", "fox", "gnu"]
    hf = getattr(transformers, cls)(getattr(transformers, config_cls)(
        **config, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}))
    hf.save_pretrained(tmp_path / "hf")
    model = uvc.load_model(str(tmp_path / "hf"))
    assert model.pretrained_cfg["label_names"] == tuple(names)
    assert "label_names" not in getattr(to_timm(hf_model("ViTForImageClassification")), "pretrained_cfg", {})  # LABEL_i
    slimmed = uvc.slim(model, half_plan(model))
    uvc.save(slimmed, tmp_path / "slim")
    loaded = uvc.load(tmp_path / "slim")
    assert loaded.pretrained_cfg["label_names"] == tuple(names)
    assert main(["info", str(tmp_path / "slim")]) == 0 and "classes: 5 (cat, dog, eel, fox, gnu)" in capsys.readouterr().out
    export_onnx(loaded, tmp_path / "slim.onnx")
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "slim.onnx")).metadata_props}
    assert json.loads(props["id2label"]) == {str(i): n for i, n in enumerate(names)}
    arch = json.loads((tmp_path / "slim" / "arch.json").read_text())
    arch["pretrained_cfg"]["label_names"] = names[:4]
    (tmp_path / "slim" / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(uvc.UVCError, match="label_names must be a list of 5 strings"):
        uvc.load(tmp_path / "slim")


def test_info_on_an_unsupported_transformers_folder_names_what_is_supported(tmp_path, capsys):
    from uvc.cli import main

    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=7)).save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' own progress bar
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'clip_vision_model'" in err and "vit, deit, dinov2" in err and len(err.strip().splitlines()) == 1
