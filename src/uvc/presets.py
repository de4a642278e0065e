"""Named presets: every value a preset sets, in one place, each with where it comes from.

A preset is a set of dotted config fields (`search.dual`, `kd.alpha`, ...) and their values. It is
applied to a fresh config first; whatever the user states afterwards (an option on the command line,
a field set in the API) overrides it. docs/method.md ("Presets") lists the same values.

"paper": UVC as published (Yu et al., ICLR 2022, arXiv 2203.08243) and its reference code
(github.com/VITA-Group/UVC: joint_train.py, uvc_optimizer.py, post_train.py, run_uvc_train.sh,
run_post_train.sh). Where the issue asking for it (#31) is silent, the paper comes first and the
reference code where the paper is silent. Schedules' lengths, the data recipe, the start plan's place at
the budget and the exact final fit stay uvc's, so that a preset run trains as long as any other run it is
compared with.
"""
from __future__ import annotations

from .errors import UVCError

# The reference trains at batch 512 with lr 1e-4 in both stages (run_uvc_train.sh --learning_rate 1e-4
# --train_batch_size 512; post_train.py scales --learning_rate 1e-4 by batch / 512): per uvc's 128 images,
REFERENCE_LR = 1e-4 * 128 / 512

PRESETS: dict[str, dict[str, object]] = {
    "paper": {
        # Paper Sec. 3 (the primal-dual algorithm): primal gradient steps of the Lagrangian on the ratios, gradient
        # ascent on z (uvc_optimizer.py: s/r by SGD lr 0.02 with the gradient's inf-norm clipped at 1, z by SGD on -L).
        "search.dual": "ascent",
        "search.ratio_lr": 0.02,  # joint_train.py --slr / --rlr 0.02
        "search.z_init": 1e-3,  # the reference's starting z
        "search.z_lr": 1.0,  # run_uvc_train.sh --zlr_schedule_list "1,5,..." : its first stage's rate
        "search.z_step_clip": 0.5,  # run_uvc_train.sh --z_grad_clip 0.5
        # Paper Sec. 3: y by dual ascent on Phi, with the proximal step on the marked groups
        # (uvc_optimizer.py prox_w; joint_train.py --ylr 1e-4), y starting at 1e-3 as the reference's does.
        "search.y_lr": 1e-4,
        "search.y_init": 1e-3,
        "search.importance": "norm",  # the reference ranks groups by their weights' norms (uvc_utils.py)
        # Neither the paper nor the reference scores activations: its counts start alike in every layer
        # (uvc's activation-scored start is uvc's own, the default since 2026-12-07).
        "search.init": "uniform",
        # Paper Sec. 3: Gumbel-sigmoid skip gates at block and half (attention / MLP) level.
        "search.skip": "both",
        "search.gates": "gumbel",
        "search.gate_lr": 0.1,  # run_uvc_train.sh --glr 0.1 (SGD, momentum 0.9: uvc_optimizer.py)
        "search.gate_momentum": 0.9,
        "search.gate_weight": 5e-4,  # run_uvc_train.sh --gating_weight 5e-4 (w_g)
        "search.gate_temperature": 0.5,  # the Gumbel-sigmoid temperature tau (0.5 in the reference)
        # Paper Sec. 3 / post_train.py: the searched weights are slimmed and post-trained.
        "search.end": "searched",
        # run_uvc_train.sh / run_post_train.sh: soft KD, --distillation-alpha 0.1, tau 1, and DeiT's loss
        # (utils/losses.py), whose KL is divided by batch x classes.
        "kd.kind": "soft",
        "kd.alpha": 0.1,
        "kd.temperature": 1.0,
        "kd.reduction": "element",
        # joint_train.py / post_train.py --max_grad_norm 1.0: the weights' gradient clipped in both stages.
        "search.schedule.clip_grad": 1.0,
        "post.clip_grad": 1.0,
        "search.schedule.lr": REFERENCE_LR,
        "post.lr": REFERENCE_LR,
    },
}


def apply_preset(cfg, name: str):
    """Set every field of preset `name` on `cfg` (a config with nested dataclasses); returns `cfg`."""
    if name not in PRESETS:
        raise UVCError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
    return set_fields(cfg, PRESETS[name])


def set_fields(cfg, changes: dict[str, object]):
    """Set dotted fields ("search.dual", "kd.alpha") of `cfg` to their values; returns `cfg`."""
    for path, value in changes.items():
        *owners, field = path.split(".")
        owner = cfg
        for o in owners:
            owner = getattr(owner, o)
        if not hasattr(owner, field):
            raise AttributeError(f"{path} is not a field of the config")
        setattr(owner, field, value)
    return cfg
