"""Every Python example in README.md and docs/*.md runs as written, so the examples cannot drift from the API.

The examples name real data and weights (an ImageNet folder, a DeiT checkpoint, a GPU). Here those
names are swapped for small stand-ins made on the spot (a tiny ImageFolder, random DeiT weights, the
CPU), and every run is shrunk to a few steps at the point where the configuration is validated. The
code itself is executed unchanged: field names, accepted types and the calls it makes are the real ones.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from uvc.compress import CompressConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def examples() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            found.append((path.name, text[:match.start()].count("\n") + 1, match.group(1)))
    return found


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(rng.normal(60 + 130 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def small_runs(monkeypatch):
    """Shrink every compression to a few steps on few images, whatever the example asked for."""
    validate = CompressConfig.validate

    def shrunk(cfg):
        cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.workers = 4, 4, 0
        cfg.data.train_limit, cfg.data.val_limit, cfg.data.test_limit = 8, 8, 8
        cfg.search.schedule.epochs, cfg.post.epochs, cfg.search.warmup_epochs = 1, 0.5, 0.5
        cfg.throughput_batch, cfg.throughput_rounds, cfg.eval_during_search = 2, 1, False
        cfg.device = "cpu"
        validate(cfg)

    monkeypatch.setattr(CompressConfig, "validate", shrunk)


@pytest.mark.parametrize("doc, line, code", examples(), ids=[f"{d}:{n}" for d, n, _ in examples()])
def test_example_runs_as_written(doc, line, code, tmp_path, monkeypatch, small_runs):
    torch.manual_seed(0)
    weights = tmp_path / "deit_small.pth"
    torch.save(timm.create_model("deit_small_patch16_224", num_classes=2).state_dict(), weights)
    stand_ins = {'"/data/imagenet"': repr(str(image_folder(tmp_path / "imagenet"))),
                 '"deit_small.pth"': repr(str(weights)),
                 "pretrained=True": f"checkpoint={str(weights)!r}"}
    for real, stand_in in stand_ins.items():
        code = code.replace(real, stand_in)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(timm, "create_model", _with_two_classes(timm.create_model))
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__example__"})


def _with_two_classes(create_model):
    """The stand-in ImageFolder has 2 classes; DeiT's 1000-class head becomes a 2-class one, as a user's fine-tuned model."""
    def create(name, *args, **kwargs):
        if name.startswith("deit"):
            kwargs.setdefault("num_classes", 2)
        return create_model(name, *args, **kwargs)
    return create


def test_the_readme_examples_are_collected():
    assert sum(doc == "README.md" for doc, _, _ in examples()) >= 2
