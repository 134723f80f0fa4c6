"""The paper's eight datasets, read from a local data root (nothing is downloaded).

Expected layout, one folder per dataset under the root, each split an image-folder tree::

    <root>/<dataset>/train/<class>/<image files>
    <root>/<dataset>/val/<class>/...      (optional: carved from train when absent)
    <root>/<dataset>/test/<class>/...

Class names are the class folder names with underscores read as spaces, unless the dataset folder
has a ``classnames.txt`` (one name per line, in the sorted order of the class folders). When a
dataset has no ``val`` folder, a validation set of the size given in the paper's appendix is
carved from train with a fixed seed (stratified over classes), and train keeps the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Subset

from .common import TaskData

# name -> (folder, validation size carved from train when there is no val folder, templates)
PAPER_DATASETS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "Cars": ("cars", 814, ("a photo of a {}.", "a photo of the {}, a type of car.", "a picture of my {}.")),
    "DTD": ("dtd", 376, ("a photo of a {} texture.", "a close-up of a {} surface.", "a {} pattern.")),
    "EuroSAT": ("eurosat", 2700, ("a satellite photo of {}.", "an aerial image of {}.", "a centered satellite view of {}.")),
    "GTSRB": ("gtsrb", 2664, ("a photo of the traffic sign \"{}\".", "a zoomed-in photo of a \"{}\" traffic sign.", "a road sign meaning {}.")),
    "MNIST": ("mnist", 5000, ("a photo of the number: \"{}\".", "a handwritten digit {}.", "an image of the digit {}.")),
    "RESISC45": ("resisc45", 1890, ("satellite imagery of {}.", "an aerial photograph of {}.", "a remote sensing image of {}.")),
    "SUN397": ("sun397", 1985, ("a photo of a {}.", "a photo of the {} scene.", "a picture taken in a {}.")),
    "SVHN": ("svhn", 5000, ("a photo of the number: \"{}\".", "a house number {}.", "a street number showing {}.")),
}


def _image_folder(path: Path, transform: Optional[Callable]):
    from torchvision.datasets import ImageFolder

    return ImageFolder(os.fspath(path), transform=transform)


def _carve(dataset, n_val: int, seed: int):
    targets = torch.as_tensor(dataset.targets)
    n = len(targets)
    n_val = min(n_val, n // 2)
    g = torch.Generator().manual_seed(seed)
    val_idx: list[int] = []
    classes = targets.unique().tolist()
    for c in classes:  # per-class share of the validation size, so the carve is stratified
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_idx += idx[:round(n_val * len(idx) / n)].tolist()
    val_set = set(val_idx)
    train_idx = [i for i in range(n) if i not in val_set]
    return Subset(dataset, train_idx), Subset(dataset, sorted(val_idx))


def check_root(root, names: Optional[Sequence[str]] = None) -> None:
    """Raise FileNotFoundError naming the first expected folder that is missing (before any model is built)."""
    for name in names or PAPER_DATASETS:
        if name not in PAPER_DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(PAPER_DATASETS)}")
        base = Path(root).expanduser() / PAPER_DATASETS[name][0]
        for path in (base, base / "train", base / "test"):
            if not path.is_dir():
                raise FileNotFoundError(f"{name}: expected the folder {path} (train/ and test/ hold one sub-folder "
                                        "per class); fastmerge does not download datasets")


def load_paper_dataset(name: str, root, transform: Optional[Callable] = None, seed: int = 0,
                       num_workers: int = 0) -> TaskData:
    """Load one of :data:`PAPER_DATASETS` from ``root`` (see the module docstring for the layout).

    Raises:
        FileNotFoundError: naming the folder that is missing.
    """
    if name not in PAPER_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(PAPER_DATASETS)}")
    check_root(root, [name])
    folder, n_val, templates = PAPER_DATASETS[name]
    base = Path(root).expanduser() / folder
    train = _image_folder(base / "train", transform)
    test = _image_folder(base / "test", transform)
    if (base / "val").is_dir():
        val = _image_folder(base / "val", transform)
    else:
        train, val = _carve(train, n_val, seed)
    classes = (train.dataset if isinstance(train, Subset) else train).classes
    for split, ds in (("val", val), ("test", test)):
        other = (ds.dataset if isinstance(ds, Subset) else ds).classes
        if other != classes:
            missing = sorted(set(classes) ^ set(other))
            raise ValueError(f"{name}: the class folders of {base / split} differ from {base / 'train'} "
                             f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); labels would not match")
    names_file = base / "classnames.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(names) != len(classes):
            raise ValueError(f"{names_file} has {len(names)} names but {base / 'train'} has {len(classes)} class folders")
    else:
        names = [c.replace("_", " ") for c in classes]
    return TaskData(name, tuple(names), templates, {"train": train, "val": val, "test": test}, num_workers=num_workers)


def load_paper_suite(root, names: Optional[Sequence[str]] = None, transform: Optional[Callable] = None,
                     seed: int = 0, num_workers: int = 0) -> list[TaskData]:
    """All eight datasets (or ``names``) from ``root``."""
    return [load_paper_dataset(n, root, transform, seed, num_workers) for n in (names or PAPER_DATASETS)]
