"""The bundled teacher: present, loadable anywhere from its two files, and as accurate as stated."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import uvc
from uvc.data import DataConfig, build_data
from uvc.engine import Schedule, evaluate
from uvc.errors import UVCError
from uvc.models import default_teacher_dir

from conftest import random_plan

ONE_EPOCH = Schedule(1, 2e-3)


def test_bundled_teacher_reaches_the_stated_accuracy(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    folder = default_teacher_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "arch.json").is_file()
    teacher = uvc.load_model()
    assert teacher.patch_embed.proj.in_channels == 1 and len(teacher.blocks) == 12 and teacher.embed_dim == 192
    top1 = evaluate(teacher, build_data(DataConfig()).test, torch.device("cpu"))
    stated = json.loads((folder / "training.json").read_text())["top1"]
    assert top1 >= 90.0  # the foundation issue's bar; the shipped file measures 90.21 %
    assert top1 == pytest.approx(stated, abs=0.01)


def test_the_benchmarks_teacher_held_validation_out_in_every_run_and_reaches_its_stated_accuracy(fmnist_available):
    """bench/teacher: the bundled teacher's five-run recipe, each run trained with the validation split held out
    (the runs that predate the split record no validation figure), so a benchmark can tune on validation."""
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    folder = Path(__file__).resolve().parents[1] / "bench" / "teacher"
    runs, record = [], json.loads((folder / "training.json").read_text())
    while record:
        runs.append(record)
        record = record.get("continues")
    assert len(runs) == 5 and all("top1_val" in r and r["config"]["data"]["train_limit"] is None for r in runs)
    assert runs[0]["tutor"] is not None and runs[1]["tutor"] is not None  # runs 4 and 5 learn from the convnet tutor
    teacher = uvc.load_model(str(folder))
    data = build_data(DataConfig())
    assert teacher.patch_embed.proj.in_channels == 1 and len(teacher.blocks) == 12 and teacher.embed_dim == 192
    assert evaluate(teacher, data.test, torch.device("cpu")) == pytest.approx(runs[0]["top1"], abs=0.01)
    assert evaluate(teacher, data.val, torch.device("cpu")) == pytest.approx(runs[0]["top1_val"], abs=0.01)


def test_train_teacher_writes_a_loadable_teacher_and_continues_from_init(tmp_path, fmnist_available):
    """A short real run: the files, the recorded accuracy, and --init starting from those weights."""
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    from uvc.teacher import TeacherConfig, train_teacher

    data = DataConfig(train_limit=256, val_limit=256, test_limit=256, batch_size=64)
    first = train_teacher(TeacherConfig(out=str(tmp_path / "a"), schedule=Schedule(1, 2e-3, warmup_epochs=0.5), data=data))
    assert first["continues"] is None and len(first["history"]) == 1
    assert not (tmp_path / "a" / "teacher_checkpoint.safetensors").exists()
    assert first["top1"] == pytest.approx(evaluate(uvc.load(tmp_path / "a"), build_data(data).test, torch.device("cpu")), abs=1e-6)
    # lr 0 leaves AdamW's weights untouched, so the continued teacher must be the first one exactly.
    second = train_teacher(TeacherConfig(out=str(tmp_path / "b"), schedule=Schedule(1, 0.0), init=str(tmp_path / "a"),
                                         data=data))
    assert second["continues"] == json.loads((tmp_path / "a" / "training.json").read_text())
    a, b = uvc.load(tmp_path / "a").state_dict(), uvc.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second["top1"] == first["top1"]
    # A slimmed model is not a teacher to continue: a clear error before any training.
    teacher = uvc.load(tmp_path / "a")
    uvc.save(uvc.slim(teacher, random_plan(teacher, torch.Generator().manual_seed(0))), tmp_path / "s")
    with pytest.raises(UVCError, match="--init takes a teacher folder"):
        train_teacher(TeacherConfig(out=str(tmp_path / "c"), schedule=ONE_EPOCH, init=str(tmp_path / "s"), data=data))


def test_train_teacher_with_a_convnet_tutor_records_it_and_resumes_past_it(tmp_path, fmnist_available, monkeypatch):
    """The tutor is trained, evaluated, kept and recorded; later runs reuse it rather than train a new one."""
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    from uvc.teacher import ConvTutor, TeacherConfig, train_teacher

    data = DataConfig(train_limit=256, val_limit=256, test_limit=256, batch_size=64)
    cfg = TeacherConfig(out=str(tmp_path / "t"), schedule=Schedule(1, 2e-3, warmup_epochs=0.5),
                        tutor=Schedule(2, 4e-3, warmup_epochs=0.5), data=data)
    result = train_teacher(cfg)
    record = result["tutor"]
    assert record["epochs"] == 2 and [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["top1_val"] == record["history"][-1]["top1_val"] and 0 < record["top1_val"] <= 100
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "arch.json", "model.safetensors", "training.json", "tutor.safetensors"]
    assert ConvTutor()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)

    # --tutor-from reuses the kept tutor (and its record) instead of training a new one.
    reused = train_teacher(TeacherConfig(out=str(tmp_path / "u"), schedule=ONE_EPOCH, tutor_from=str(tmp_path / "t"),
                                         data=data))
    assert reused["tutor"] == {**record, "from": str(tmp_path / "t")}
    with pytest.raises(UVCError, match="holds no tutor.safetensors"):
        train_teacher(TeacherConfig(out=str(tmp_path / "v"), schedule=ONE_EPOCH, tutor_from=str(tmp_path / "s"), data=data))
    with pytest.raises(UVCError, match="pass only one"):
        train_teacher(TeacherConfig(out=str(tmp_path / "v"), tutor=Schedule(1, 4e-3), tutor_from=str(tmp_path / "t"),
                                    data=data))

    # A run killed in its first teacher epoch, after its tutor phase: the tutor checkpoint is complete,
    # the ViT has none yet. Resuming must load that tutor (no tutor epoch re-run) and finish the ViT.
    import uvc.teacher
    real_epoch, calls = uvc.teacher.train_epoch, []

    def counted_epoch(*args, **kwargs):
        calls.append(1)
        if interrupt_at and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(uvc.teacher, "train_epoch", counted_epoch)
    out, interrupt_at = tmp_path / "r", 3  # two tutor epochs, then the teacher's first
    killed = TeacherConfig(out=str(out), schedule=ONE_EPOCH, tutor=Schedule(2, 4e-3), data=data)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(killed)
    assert (out / "tutor_checkpoint.safetensors").is_file() and not (out / "teacher_checkpoint.safetensors").exists()
    calls.clear()
    interrupt_at = None
    with pytest.raises(UVCError, match="unfinished run"):
        train_teacher(killed)
    with pytest.raises(UVCError, match=r"other settings \(tutor.lr: 0.004 -> 0.002\)"):
        train_teacher(replace(killed, tutor=Schedule(2, 2e-3), resume=True))
    resumed = train_teacher(replace(killed, resume=True))
    assert len(calls) == 1 and [h["epoch"] for h in resumed["tutor"]["history"]] == [1, 2]
    assert not (out / "tutor_checkpoint.safetensors").exists()


def test_teacher_architecture_is_a_timm_model_name():
    import timm

    uvc.load_model("deit_tiny_patch16_224")
    model = timm.create_model("vit_tiny_patch7_fmnist")
    assert uvc.macs(model) == uvc.macs(uvc.load_model())
