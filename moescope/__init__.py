"""moescope: open up Mixture-of-Experts language models and see how their experts and routers behave."""
from ._version import __version__
from .arch import MoEModel, families, get_family, open_model
from .checkpoint import Checkpoint
from .dynamic.run import TraceOptions, trace
from .errors import MoescopeError
from .results import Results, load_results
from .static.run import WeightsOptions, weights

__all__ = ["Checkpoint", "MoEModel", "MoescopeError", "Results", "TraceOptions", "WeightsOptions", "families", "get_family",
           "load_results", "open_model", "trace", "weights", "__version__"]
