"""Expert pruning and merging for MoE checkpoints, scored on a calibration forward pass (``docs/compression.md``).

>>> from moescope.compress import compress, evaluate
>>> record = compress("mixtral-tiny", "out/mixtral-pruned", prune=2, calibration_texts=texts)
>>> evaluate("out/mixtral-pruned", held_out_texts)["perplexity"]
"""
from .calibrate import (MIN_CALIBRATION_TOKENS, Calibration, LayerData, calibrate, encode_calibration, layer_data,
                        relative_error, route, simulate)
from .candidates import Member, PairMatch, align, match_neurons, merge_members, neuron_scores, pair_match
from .edit import (check_writable, compress, expert_count, format_summary, parse_amount, read_record,
                   updated_config, write_compressed)
from .errors import CalibrationError, CompressionError, ExpertCountError, UnsupportedLayoutError
from .evaluate import evaluate
from .importance import SCORES, expert_importance
from .plan import (DEFAULT_STRATEGY, MERGE_STRATEGIES, PRUNE_STRATEGIES, LayerState, fit_router, merge_candidates,
                   plan_merge, plan_prune)

__all__ = ["DEFAULT_STRATEGY", "MERGE_STRATEGIES", "MIN_CALIBRATION_TOKENS", "PRUNE_STRATEGIES", "SCORES",
           "Calibration", "CalibrationError", "CompressionError", "ExpertCountError", "LayerData", "LayerState",
           "Member", "PairMatch", "UnsupportedLayoutError", "align", "calibrate", "check_writable", "compress",
           "encode_calibration", "evaluate", "expert_count", "expert_importance", "fit_router", "format_summary",
           "layer_data", "match_neurons", "merge_candidates", "merge_members", "neuron_scores", "pair_match",
           "parse_amount", "plan_merge", "plan_prune", "read_record", "relative_error", "route", "simulate",
           "updated_config", "write_compressed"]
