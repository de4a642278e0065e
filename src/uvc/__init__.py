"""uvc: Unified Visual Transformer Compression (ICLR 2022), with physical slimming."""
from .errors import UVCError
from .flops import macs
from .gates import LayerPlan, get_plan, make_compressible, set_plan
from .io import load, save
from .models import load_model
from .slim import slim

__all__ = ["UVCError", "macs", "LayerPlan", "get_plan", "make_compressible", "set_plan", "load", "save",
           "load_model", "slim"]
__version__ = "0.1.0"
