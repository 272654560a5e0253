"""Family adapters: declarative family descriptions read by one generic adapter."""
from .adapter import MoEModel, RoutingFacts, open_model
from .registry import detect_family, families, get_family
from .spec import MATRICES, Family, TensorSource

__all__ = ["MoEModel", "RoutingFacts", "open_model", "detect_family", "families", "get_family", "MATRICES",
           "Family", "TensorSource"]
