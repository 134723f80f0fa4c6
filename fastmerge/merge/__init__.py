"""Checkpoint merging: mergekit-style YAML configs over safetensors folders (``fastmerge merge``).

Layout: :mod:`.config` (the YAML), :mod:`.io` (safetensors headers, memory-mapped reads, sharded
writes), :mod:`.methods` (each method's parameters and fast path), :mod:`.reference` (their
pure-PyTorch twins), :mod:`.rng` (the counter-based random stream), :mod:`.plan` (every check before a
weight is read), :mod:`.dist` (the ranks of a ``torchrun`` job) and :mod:`.run` (the streaming merge,
the partial folder that ``--resume`` finishes, and the output folder).
"""

from .config import ConfigError, MergeConfig, load_config
from .dist import CollectiveTimeout, RankFailed
from .io import CheckpointError
from .methods import METHODS
from .plan import PlanError, build_plan
from .run import MergeError, MergeInterrupted, MergeOptions, MergeResult, dry_run, merge_checkpoints

__all__ = ["merge_checkpoints", "dry_run", "MergeOptions", "MergeResult", "MergeConfig", "load_config", "build_plan",
           "METHODS", "ConfigError", "CheckpointError", "PlanError", "MergeError", "MergeInterrupted", "RankFailed",
           "CollectiveTimeout"]
