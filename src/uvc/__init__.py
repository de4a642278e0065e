"""uvc: Unified Visual Transformer Compression (ICLR 2022), with physical slimming."""
from . import t2t  # registers the T2T-ViT models (timm names t2t_vit_*) and their adapter
from .compress import CompressConfig, compress
from .errors import UVCError
from .flops import macs
from .gates import get_plan, make_compressible, set_plan
from .models import load, load_model, save
from .plan import LayerPlan
from .slim import slim

__all__ = ["UVCError", "macs", "LayerPlan", "get_plan", "make_compressible", "set_plan", "load", "save",
           "load_model", "slim", "CompressConfig", "compress"]
__version__ = "0.1.0"
