"""uvc: Unified Visual Transformer Compression (ICLR 2022), with physical slimming."""
from .errors import UVCError
from .flops import macs
from .gates import LayerPlan, get_plan, make_compressible, set_plan
from .io import load, save
from .models import load_model
from .slim import slim
from .compress import CompressConfig, compress
from . import t2t  # registers the T2T-ViT models (timm names t2t_vit_*) and their adapter

__all__ = ["UVCError", "macs", "LayerPlan", "get_plan", "make_compressible", "set_plan", "load", "save",
           "load_model", "slim", "CompressConfig", "compress"]
__version__ = "0.1.0"
