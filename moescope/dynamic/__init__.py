"""Dynamic analyses: one forward pass of the real model, every expert recomputed on the captured inputs."""
from .inputs import CHAT_PROMPT, SHORT_PROMPT, select_input
from .run import TraceOptions, trace

__all__ = ["CHAT_PROMPT", "SHORT_PROMPT", "TraceOptions", "select_input", "trace"]
