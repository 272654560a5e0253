"""moescope: open up Mixture-of-Experts language models and see how their experts and routers behave."""
from .arch import MoEModel, families, get_family, open_model
from .checkpoint import Checkpoint
from .errors import MoescopeError

__version__ = "0.1.0"
__all__ = ["Checkpoint", "MoEModel", "MoescopeError", "families", "get_family", "open_model", "__version__"]
