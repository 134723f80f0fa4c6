"""Task data shared by the built-in suite and the paper's datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val", "test")


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor [n, 3, H, W] with int64 labels; batches are sliced, not collated."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [n, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@dataclass
class TaskData:
    """One classification task: class names, prompt templates and its splits.

    ``splits`` maps "train", "val" and "test" to datasets yielding ``(image, label)``. Images are
    either uint8 [3, H, W] (in-memory tasks; :attr:`mean`/:attr:`std` normalise them) or float
    tensors already transformed by the dataset (folder datasets use the model's preprocessing).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    splits: Mapping[str, Dataset]
    image_size: Optional[int] = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    num_workers: int = 0
    _norm: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"task {self.name!r} has no {', '.join(missing)} split")
        if not self.classnames or not self.templates:
            raise ValueError(f"task {self.name!r} needs class names and prompt templates")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if self._norm is None:
            self._norm = (torch.tensor(self.mean).view(1, 3, 1, 1) * 255.0, torch.tensor(self.std).view(1, 3, 1, 1) * 255.0)
        m, s = self._norm
        return (images.float() - m) / s

    def batches(self, split: str, index_batches: Sequence[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) for each list of indices, in order."""
        ds = self.splits[split]
        if isinstance(ds, InMemoryImages):
            for idx in index_batches:
                idx_t = torch.as_tensor(idx, dtype=torch.int64)
                yield self._prepare(ds.images[idx_t]), ds.labels[idx_t]
            return
        loader = DataLoader(ds, batch_sampler=[list(b) for b in index_batches], num_workers=self.num_workers)
        for images, labels in loader:
            yield self._prepare(images), labels

    def eval_batches(self, split: str, batch_size: int = 256, limit: Optional[int] = None):
        """Batches over a split in order; with ``limit``, over a fixed seeded sample of that many images
        (folder datasets are sorted by class, so their first images would be one or two classes)."""
        n = self.size(split)
        if limit is None or limit >= n:
            idx = list(range(n))
        else:
            idx = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].tolist())
        return self.batches(split, [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)])

    def train_batches(self, batch_size: int, steps: int, generator: torch.Generator, split: str = "train"):
        """``steps`` batches drawn by reshuffling ``split`` (the train split by default) each epoch."""
        n = self.size(split)
        if n == 0:
            raise ValueError(f"task {self.name!r} has an empty {split} split")
        order: list[int] = []
        out = []
        for _ in range(steps):
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = torch.randperm(n, generator=generator).tolist()
                take = min(batch_size - len(batch), len(order))
                batch += order[:take]
                del order[:take]
            out.append(batch)
        return self.batches(split, out)
