"""Transfer, then compress: a model for other classes gets a head fitted on its frozen features."""
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.compress import CompressConfig, compress
from uvc.data import DataConfig, build_data
from uvc.engine import Schedule, evaluate
from uvc.search import SearchConfig
from uvc.transfer import calibrated_head, fit_head, predicts, ridge_probe

pytestmark = pytest.mark.usefixtures("require_fmnist")


@pytest.fixture
def require_fmnist(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does this)")


def vit_for(num_classes: int) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=num_classes, embed_dim=48, depth=2,
                             num_heads=2).eval()


def config(out, **changes):
    return CompressConfig(out=str(out), budget=0.5, device="cpu", throughput_batch=8, throughput_rounds=1,
                          post=Schedule(1, 3e-4), data=DataConfig(train_limit=1024, val_limit=256, test_limit=256, batch_size=64),
                          search=SearchConfig(schedule=Schedule(1, 3e-4), warmup_epochs=0.25), **changes)


@pytest.mark.parametrize("classes_before", [3, 0])  # a classifier for other classes, and a headless backbone
def test_a_fitted_head_reads_the_frozen_features_and_keeps_them(classes_before):
    model = vit_for(classes_before)
    blocks_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    data = build_data(DataConfig(train_limit=2048, val_limit=512, batch_size=64, workers=0), seed=0)
    chosen = fit_head(model, data.calibration, data.val, 10, torch.device("cpu"))
    assert predicts(model) == 10 and model.num_classes == 10 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in blocks_before.items())  # the features stay frozen
    # Random ViT features still separate Fashion-MNIST far above chance (10 %): the probe is a real fit.
    assert chosen["top1_val"] == pytest.approx(evaluate(model, data.val, torch.device("cpu")), abs=1e-9)
    assert chosen["top1_val"] > 50 and chosen["images"] == 2048
    assert chosen["logit_scale"] > 1  # least squares' flat logits are sharpened for KD


def test_calibrated_head_ranks_as_least_squares_and_sharpens_its_softmax():
    """The logit scale changes no prediction but lowers validation cross-entropy: raw ridge logits (fitted to
    0/1 targets) give a softmax near uniform, which KD would distil as if the teacher were unsure."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 16, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(16, 5, generator=gen, dtype=torch.float64)).argmax(1)
    train, val = slice(0, 800), slice(800, None)
    probe = ridge_probe(x[train], y[train], x[val], y[val], 5)
    head = calibrated_head(x[train], y[train], x[val], y[val], 5)
    xv = torch.cat([x[val], torch.ones(400, 1, dtype=x.dtype)], 1)
    raw, calibrated = xv @ probe["weight"], xv @ head["weight"].T
    assert torch.equal(raw.argmax(1), calibrated.argmax(1)) and head["top1_val"] == probe["top1_val"] > 70
    assert head["logit_scale"] > 1 and torch.allclose(calibrated, head["logit_scale"] * raw)
    ce = torch.nn.functional.cross_entropy
    assert ce(calibrated, y[val]) < 0.8 * ce(raw, y[val])
    assert torch.softmax(calibrated, 1).max(1).values.mean() > torch.softmax(raw, 1).max(1).values.mean() + 0.2


def test_compress_with_num_classes_transfers_then_compresses(tmp_path):
    source = tmp_path / "three_classes"
    uvc.save(vit_for(3), source)
    with pytest.raises(uvc.UVCError, match="pass --num-classes 10"):
        compress(config(tmp_path / "refused", model=str(source)))
    with pytest.raises(uvc.UVCError, match="pass --num-classes 10"):
        compress(config(tmp_path / "wrong", model=str(source), num_classes=7))
    report = compress(config(tmp_path / "run", model=str(source), num_classes=10))
    assert report["transfer"]["num_classes"] == 10 and report["transfer"]["top1_val"] > 40
    assert report["top1_val_teacher"] == pytest.approx(report["transfer"]["top1_val"])  # the fitted model is the teacher
    slimmed = uvc.load(tmp_path / "run")
    assert slimmed(torch.zeros(1, 1, 28, 28)).shape == (1, 10) and 0.49 <= report["ratio"] <= 0.5
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["num_classes"] == 10
