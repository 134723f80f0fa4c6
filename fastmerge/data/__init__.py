"""Task data: the built-in suite (no download) and the paper's eight datasets from a local root."""

from .builtin import TASKS as BUILTIN_TASKS, builtin_suite, builtin_task
from .common import InMemoryImages, TaskData
from .paper import PAPER_DATASETS, check_root, load_paper_dataset, load_paper_suite

__all__ = ["BUILTIN_TASKS", "builtin_suite", "builtin_task", "InMemoryImages", "TaskData", "PAPER_DATASETS", "check_root",
           "load_paper_dataset", "load_paper_suite"]
