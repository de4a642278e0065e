"""uvc: Unified Visual Transformer Compression (ICLR 2022), with physical slimming.

The public names load their module (and torch, timm) on first use (PEP 562), so `import uvc` and
`uvc --help` start at once. Submodules load the same way: `uvc.budget.uniform_plan` works after `import uvc`.
"""
import importlib.util
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {"UVCError": "errors", "macs": "flops", "LayerPlan": "plan", "get_plan": "gates", "make_compressible": "gates",
        "set_plan": "gates", "load": "models", "save": "models", "load_model": "models", "slim": "slim",
        "CompressConfig": "compress", "compress": "compress"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Package(types.ModuleType):
    """Importing the submodule `uvc.slim` or `uvc.compress` must not replace the function of that name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
