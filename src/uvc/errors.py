"""One exception type for every problem a user can fix, so the CLI can print it without a traceback."""
from __future__ import annotations

import dataclasses
import math


class UVCError(Exception):
    """A bad input or state, with a message that names the problem and the fix."""


def check_finite(config, flags: dict[str, str], prefix: str = "") -> None:
    """Refuse a NaN or infinite number anywhere in a (nested) config dataclass.

    Range checks such as `lr < 0` pass NaN silently, so this runs first. `flags` maps dotted field
    names to the command-line option a user typed, for the message.
    """
    for f in dataclasses.fields(config):
        name, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, flags, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UVCError(f"{flags.get(name, name)} is {value}; pass a finite number")
