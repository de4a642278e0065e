"""Backbones (models without a classifier) are compressed by distilling their features, from folders without classes."""
import copy
import json
import logging
import warnings

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.backbone import drop_head, feature_cosine, is_backbone
from uvc.cli import main
from uvc.compress import CompressConfig, compress
from uvc.data import DataConfig, build_data, images_without_classes, load_fashion_mnist
from uvc.distill import KDConfig, feature_distillation_loss, features_of
from uvc.engine import Schedule, make_optimizer
from uvc.search import SearchConfig

pytestmark = pytest.mark.usefixtures("require_fmnist")
CPU = torch.device("cpu")


@pytest.fixture
def require_fmnist(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does this)")


def tiny_vit(num_classes: int = 0, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=num_classes, embed_dim=48, depth=2,
                             num_heads=2).eval()


def write_pngs(folder, count: int, offset: int = 0):
    """Fashion-MNIST training images as PNG files, no labels."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_fashion_mnist("train", limit=offset + count)
    for i, image in enumerate(images[offset:]):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"img{i:04d}.png")
    return folder


def config(out, data: str = "fashion-mnist", **changes):
    """A quick run: one epoch of search and of post-training (none after one-shot), no speed timing."""
    return CompressConfig(out=str(out), budget=0.5, device="cpu", throughput_batch=8, throughput_rounds=0,
                          post=Schedule(None, 1e-4), search=SearchConfig(schedule=Schedule(1, 1e-4), warmup_epochs=0.25),
                          data=DataConfig(data=data, train_limit=512, val_limit=256, batch_size=32, eval_batch_size=64,
                                          workers=0), **changes)


def test_features_of_records_pooled_and_tokens_and_leaves_no_hooks():
    model = tiny_vit()
    x = torch.randn(3, 1, 28, 28)
    with features_of(model) as found:
        pooled = model(x)
    assert torch.equal(found["pooled"], pooled)  # a backbone's output is its pooled feature
    assert torch.equal(found["tokens"], model.forward_features(x)) and found["tokens"].shape == (3, 17, 48)
    twin = copy.deepcopy(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())


def test_feature_loss_is_zero_for_the_teacher_itself_and_trains_a_perturbed_student():
    teacher, student = tiny_vit(), tiny_vit(seed=1)
    x = torch.randn(8, 1, 28, 28)
    with features_of(teacher) as t, features_of(teacher) as s:
        teacher(x)
    assert feature_distillation_loss(None, None, s, t, KDConfig(kind="features")).item() == pytest.approx(0, abs=1e-6)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        with features_of(student) as s, features_of(teacher) as t:
            student(x)
            with torch.no_grad():
                teacher(x)
        loss = feature_distillation_loss(None, None, s, t, KDConfig(kind="features"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert 0 < losses[-1] < 0.5 * losses[0]
    # A classifier distilled by features keeps its labels term: (1 - alpha) CE + alpha features.
    classifier = tiny_vit(num_classes=10)
    with features_of(classifier) as c:
        logits = classifier(x)
    labels = torch.arange(8)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert feature_distillation_loss(logits, labels, c, c, KDConfig(kind="features", alpha=0.3)).item() == pytest.approx(
        0.7 * ce.item(), rel=1e-5)


def test_drop_head_makes_a_backbone_of_a_classifier():
    model = tiny_vit(num_classes=10)
    assert not is_backbone(model)
    drop_head(model)
    assert is_backbone(model) and model(torch.zeros(2, 1, 28, 28)).shape == (2, 48)
    assert feature_cosine(model, model, [(torch.randn(4, 1, 28, 28), torch.zeros(4))], CPU) == pytest.approx(1.0)


def test_folders_without_classes(tmp_path):
    flat = write_pngs(tmp_path / "flat", 25)
    train, val = images_without_classes(flat)
    assert len(val) == 3 and len(train) == 22 and not set(train) & set(val)  # every tenth held out
    split = tmp_path / "split"
    write_pngs(split / "train", 6), write_pngs(split / "val", 2, offset=6)
    train, val = images_without_classes(split)
    assert [f.parent.name for f in train + val] == ["train"] * 6 + ["val"] * 2
    write_pngs(tmp_path / "classes" / "train" / "shirt", 2)
    assert images_without_classes(tmp_path / "classes") is None  # ImageNet layout: labelled
    data = build_data(DataConfig(data=str(flat), batch_size=4, workers=0), input_size=(1, 28, 28), labels=False)
    x, y = next(iter(data.val))
    assert data.num_classes == 0 and data.mixup is None and x.shape == (3, 1, 28, 28) and (y == -1).all()
    with pytest.raises(uvc.UVCError, match="without class sub-folders.*--num-classes 0"):
        build_data(DataConfig(data=str(flat), workers=0), input_size=(1, 28, 28))


def test_a_backbone_compresses_one_shot_from_a_folder_without_classes(tmp_path, caplog):
    folder = write_pngs(tmp_path / "imgs", 120)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning on a normal run
        report = compress(config(tmp_path / "run", data=str(folder), one_shot=True), model=tiny_vit())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # timm's scheduler warning is gone
    assert report["task"] == "backbone" and report["config"]["kd"]["kind"] == "features"
    assert report["top1"] is None and report["linear_probe_val"] is None  # no labels, no probe
    assert 0.95 < report["feature_cosine_val"] <= 1 and report["ratio"] <= 0.5
    assert report["throughput"] is None and "skipped" in report["throughput_detail"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["feature_cosine_val"] == report["feature_cosine_val"]
    slimmed = uvc.load(tmp_path / "run")
    assert is_backbone(slimmed) and slimmed(torch.zeros(2, 1, 28, 28)).shape == (2, 48)
    assert (tmp_path / "run" / "report.png").stat().st_size > 0
    with pytest.raises(uvc.UVCError, match="--num-classes 0"):  # a classifier cannot learn from it
        compress(config(tmp_path / "refused", data=str(folder), one_shot=True), model=tiny_vit(num_classes=10))
    with pytest.raises(uvc.UVCError, match="drop --kd none"):
        compress(config(tmp_path / "no_kd", data=str(folder), one_shot=True, kd=KDConfig(kind="none")), model=tiny_vit())


def test_num_classes_0_searches_a_classifier_as_a_backbone_with_a_linear_probe(tmp_path):
    classifier = tiny_vit(num_classes=10)
    report = compress(config(tmp_path / "run", num_classes=0), model=classifier)
    assert classifier.head.out_features == 10  # the caller's model keeps its head
    assert [e["phase"] for e in report["evals"]] == ["search", "post", "post"] and all(0 < e["cosine_val"] <= 1 for e in report["evals"])
    assert report["history"] and all(h["loss"] >= 0 for h in report["history"])
    probe = report["linear_probe_val"]
    assert probe["dense"] > 30 and probe["slimmed"] > 30  # random features of Fashion-MNIST, 10 classes
    assert 0.9 < report["feature_cosine_val"] <= 1 and 0.9 < report["feature_cosine_val_after_search"] <= 1
    assert is_backbone(uvc.load(tmp_path / "run"))


def test_the_command_line_compresses_a_hugging_face_backbone_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ViTModel(transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=96, image_size=28, patch_size=7, num_channels=1),
                               add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "hf")
    split = tmp_path / "data"
    write_pngs(split / "train", 64), write_pngs(split / "val", 16, offset=64)
    code = main(["compress", "--model", str(tmp_path / "hf"), "--data", str(split), "--one-shot", "--timing-rounds", "0",
                 "--device", "cpu", "--batch-size", "16", "--workers", "0", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "feature cosine to the teacher" in out and "speed not timed" in out
    slimmed = uvc.load(tmp_path / "run")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        reference = hf(pixel_values=x).last_hidden_state[:, 0]
        cosine = torch.nn.functional.cosine_similarity(slimmed(x), reference, dim=-1)
    assert cosine.min() > 0.8  # the slimmed model still computes the transformers model's class-token feature


def test_no_scheduler_for_a_phase_without_steps(caplog):
    model = tiny_vit()
    optimizer, scheduler = make_optimizer(model, Schedule(0.0, 1e-4), steps_per_epoch=10, batch_size=128)
    assert scheduler is None and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert make_optimizer(model, Schedule(1.0, 1e-4), steps_per_epoch=10, batch_size=128)[1] is not None


def test_a_classifier_result_is_saved_with_its_class_names(tmp_path):
    from uvc.data import FASHION_MNIST_CLASSES

    compress(config(tmp_path / "run", one_shot=True), model=tiny_vit(num_classes=10))
    assert uvc.load(tmp_path / "run").pretrained_cfg["label_names"] == FASHION_MNIST_CLASSES
