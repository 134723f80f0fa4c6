"""Flat-buffer layer.

A *flat buffer* is a single contiguous 1-D tensor that holds every parameter
of a model, one after the other, in a fixed order.  :class:`FlatLayout`
records that order (names, shapes, element counts and offsets) and converts
between the usual ``name -> tensor`` view of a model and the flat buffer:

* :meth:`FlatLayout.flatten` copies tensors into a flat buffer (one copy);
* :meth:`FlatLayout.unflatten` returns zero-copy views into a flat buffer;
* :meth:`FlatLayout.bind` makes a module's parameters *be* views of a flat
  buffer, so that merging kernels can operate on the whole model with a single
  1-D tensor while the module keeps working as usual;
* :meth:`FlatLayout.block_offsets` describes a tiling of the buffer into
  blocks (per tensor, per row, or global) for block-wise kernels.

Example:
    >>> import torch
    >>> from fastmerge.flat import FlatLayout
    >>> model = torch.nn.Linear(3, 2)
    >>> layout = FlatLayout.from_module(model)
    >>> layout.names, layout.offsets
    (('weight', 'bias'), (0, 6, 8))
    >>> flat = layout.flatten(model)
    >>> views = layout.unflatten(flat)
    >>> views["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

__all__ = [
    "FlatLayout",
    "flatten_module",
    "layout_of",
]

_LAYOUT_METADATA_KEY = "fastmerge.flat_layout"
_FORMAT_VERSION = 1

_BLOCK_KINDS = ("tensor", "row", "global")

# safetensors dtype codes -> torch dtypes (used to pick the buffer dtype
# without materialising every tensor twice).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

DeviceLike = Union[str, torch.device, int, None]
Tensors = Union[torch.nn.Module, Mapping[str, Any], Sequence[torch.Tensor]]


def _dtype_to_str(dtype: Optional[torch.dtype]) -> Optional[str]:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def _dtype_from_str(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _uniform_dtype(tensors: Iterable[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype shared by all ``tensors``, or None if mixed/empty."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else None


def _promoted_dtype(tensors: Iterable[torch.Tensor]) -> Optional[torch.dtype]:
    dtypes = [t.dtype for t in tensors]
    if not dtypes:
        return None
    return functools.reduce(torch.promote_types, dtypes)


def _storage_key(t: torch.Tensor):
    """Identity of the memory a tensor views (None when not comparable)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # e.g. tensors without storage
        return None
    return (t.device, ptr, t.dtype, tuple(t.shape), t.stride())


def _owner_and_attr(root: torch.nn.Module, name: str):
    prefix, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(prefix) if prefix else root
    except AttributeError:
        return None, attr
    return owner, attr


def _module_entries(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` under every registered name."""
    entries: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        entries.setdefault(name, p)
    for name, b in module.named_buffers(remove_duplicate=False):
        if b is not None:
            entries.setdefault(name, b)
    return entries


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """Order, shapes and offsets of the tensors stored in a flat buffer.

    Tensor ``i`` (named ``names[i]``, shaped ``shapes[i]``) occupies
    ``flat[offsets[i]:offsets[i + 1]]`` of a flat buffer, in row-major order.
    Layouts are immutable; two layouts compare equal (and hash equal) when
    their names and shapes are equal, regardless of the recorded ``dtype``.

    Args:
        names: Unique tensor names, in buffer order.
        shapes: One shape per name (anything ``torch.Size`` accepts).
        dtype: Optional dtype recorded from the source (informational; it is
            used as a default when no other dtype is known).

    Attributes:
        names: ``tuple[str, ...]`` of tensor names.
        shapes: ``tuple[torch.Size, ...]``.
        dtype: ``torch.dtype`` or None.
        numels: ``tuple[int, ...]`` element count of each tensor.
        offsets: ``tuple[int, ...]`` of length ``len(layout) + 1``; starts at
            0 and ends at :attr:`numel`.

    Example:
        >>> layout = FlatLayout.from_shapes([("w", (2, 3)), ("b", (2,))])
        >>> layout.numel, layout.slice("b")
        (8, slice(6, 8, None))
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: Optional[torch.dtype] = None
    numels: tuple[int, ...] = field(init=False, repr=False)
    offsets: tuple[int, ...] = field(init=False, repr=False)
    _index: dict = field(init=False, repr=False)
    _hash: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        shapes = tuple(self.shapes)
        if len(names) != len(shapes):
            raise ValueError(
                f"names and shapes must have the same length, got "
                f"{len(names)} names and {len(shapes)} shapes"
            )
        index: dict[str, int] = {}
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise TypeError(f"names must be strings, got {name!r}")
            if name in index:
                raise ValueError(f"duplicate tensor name {name!r} in layout")
            index[name] = i
        sizes = []
        for name, shape in zip(names, shapes):
            try:
                size = torch.Size([operator.index(d) for d in shape])
            except TypeError as exc:
                raise ValueError(
                    f"invalid shape {shape!r} for tensor {name!r}"
                ) from exc
            if any(d < 0 for d in size):
                raise ValueError(
                    f"invalid shape {tuple(size)} for tensor {name!r}: "
                    "dimensions must be non-negative"
                )
            sizes.append(size)
        numels = tuple(int(s.numel()) for s in sizes)
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {self.dtype!r}")
        set_ = object.__setattr__
        set_(self, "names", names)
        set_(self, "shapes", tuple(sizes))
        set_(self, "numels", numels)
        set_(self, "offsets", tuple(offsets))
        set_(self, "_index", index)
        set_(self, "_hash", hash((names, tuple(sizes))))

    # ------------------------------------------------------------------
    # constructors
    # ------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        include_buffers: bool = False,
        requires_grad_only: bool = False,
    ) -> "FlatLayout":
        """Layout of a module's parameters (and optionally buffers).

        Parameters come in ``module.named_parameters()`` order; a parameter
        registered under several names (tied weights) appears once, under its
        first name.  Buffers, when included, follow the parameters in
        ``named_buffers()`` order.

        Args:
            module: The module to describe.
            include_buffers: Also include (non-None) buffers.
            requires_grad_only: Only include parameters with
                ``requires_grad=True`` (buffers are unaffected).

        Returns:
            The layout; ``dtype`` is the common dtype of the included tensors,
            or None when they are mixed.

        Example:
            >>> FlatLayout.from_module(torch.nn.Linear(4, 2)).names
            ('weight', 'bias')
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        items: list[tuple[str, torch.Tensor]] = []
        for name, p in module.named_parameters():
            if requires_grad_only and not p.requires_grad:
                continue
            items.append((name, p))
        if include_buffers:
            for name, b in module.named_buffers():
                if b is not None:
                    items.append((name, b))
        return cls(
            tuple(n for n, _ in items),
            tuple(t.shape for _, t in items),
            _uniform_dtype(t for _, t in items),
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, dedupe_tied: bool = True
    ) -> "FlatLayout":
        """Layout of the tensor entries of a state dict, in iteration order.

        Non-tensor entries (e.g. ``_metadata`` or extra state) are skipped.

        Args:
            state_dict: Mapping from names to tensors.
            dedupe_tied: Keep only the first of several entries that are the
                very same memory (same data pointer, shape, strides, dtype and
                device), as ``module.state_dict()`` produces for tied
                parameters.  This makes ``from_state_dict(m.state_dict())``
                agree with ``from_module(m, include_buffers=True)`` for
                modules with tied weights.

        Returns:
            The layout; ``dtype`` is the common dtype of the entries, or None.

        Example:
            >>> m = torch.nn.Linear(4, 2)
            >>> FlatLayout.from_state_dict(m.state_dict()) == FlatLayout.from_module(m)
            True
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        items: list[tuple[str, torch.Tensor]] = []
        seen: set = set()
        for name, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                continue
            if dedupe_tied:
                key = _storage_key(value)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
            items.append((str(name), value))
        return cls(
            tuple(n for n, _ in items),
            tuple(t.shape for _, t in items),
            _uniform_dtype(t for _, t in items),
        )

    @classmethod
    def from_shapes(
        cls,
        pairs: Union[Iterable[tuple[str, Sequence[int]]], Mapping[str, Sequence[int]]],
        *,
        dtype: Optional[torch.dtype] = None,
    ) -> "FlatLayout":
        """Layout from ``(name, shape)`` pairs (or a ``name -> shape`` mapping).

        Args:
            pairs: Iterable of ``(name, shape)`` pairs, in buffer order.
            dtype: Optional dtype to record.

        Returns:
            The layout.

        Example:
            >>> FlatLayout.from_shapes([("a", ()), ("b", (3,))]).offsets
            (0, 1, 4)
        """
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        names: list[str] = []
        shapes: list[Any] = []
        for pair in pairs:
            try:
                name, shape = pair
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"pairs must contain (name, shape) pairs, got {pair!r}"
                ) from exc
            names.append(name)
            shapes.append(shape)
        return cls(tuple(names), tuple(shapes), dtype)

    # ------------------------------------------------------------------
    # container protocol
    # ------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Total number of elements of the flat buffer."""
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        """Position of ``name`` in the layout.

        Raises:
            KeyError: if ``name`` is not in the layout.
        """
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the layout") from None

    def slice(self, name: str) -> slice:
        """Python slice of ``name``'s elements in the flat buffer.

        Example:
            >>> layout = FlatLayout.from_shapes([("w", (2, 3)), ("b", (2,))])
            >>> layout.slice("w")
            slice(0, 6, None)
        """
        i = self.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FlatLayout):
            return NotImplemented
        return self.names == other.names and self.shapes == other.shapes

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        dtype = _dtype_to_str(self.dtype)
        return f"FlatLayout(tensors={len(self)}, numel={self.numel}, dtype={dtype})"

    # ------------------------------------------------------------------
    # blocks
    # ------------------------------------------------------------------
    def block_offsets(
        self, kind: str = "tensor", *, row_block: Optional[int] = None
    ) -> torch.Tensor:
        """Boundaries of a tiling of the flat buffer into blocks.

        Block ``j`` covers ``flat[b[j]:b[j + 1]]``; the result starts at 0,
        ends at :attr:`numel` and is non-decreasing.

        Args:
            kind: ``"tensor"``: one block per tensor (equal to
                :attr:`offsets`); ``"row"``: one block per leading-dimension
                row of each tensor (0-d and 1-d tensors are one block each,
                tensors with zero rows contribute no block); ``"global"``: a
                single block ``[0, numel]``.
            row_block: Only for ``kind="row"``: group this many consecutive
                rows of a tensor into one block (the last block of a tensor
                may hold fewer rows).  Defaults to 1.

        Returns:
            A 1-D CPU ``torch.int64`` tensor of block boundaries.

        Example:
            >>> layout = FlatLayout.from_shapes([("w", (2, 3)), ("b", (2,))])
            >>> layout.block_offsets("row").tolist()
            [0, 3, 6, 8]
        """
        if kind not in _BLOCK_KINDS:
            raise ValueError(f"kind must be one of {_BLOCK_KINDS}, got {kind!r}")
        if row_block is not None:
            if kind != "row":
                raise ValueError("row_block is only supported with kind='row'")
            if isinstance(row_block, bool) or not isinstance(row_block, int) or row_block < 1:
                raise ValueError(f"row_block must be a positive int, got {row_block!r}")
        if kind == "tensor":
            return torch.tensor(self.offsets, dtype=torch.int64)
        if kind == "global":
            return torch.tensor([0, self.numel], dtype=torch.int64)
        step = 1 if row_block is None else row_block
        parts: list[torch.Tensor] = []
        for shape, numel, start in zip(self.shapes, self.numels, self.offsets):
            if len(shape) <= 1:
                parts.append(torch.tensor([start], dtype=torch.int64))
                continue
            rows = shape[0]
            if rows == 0:
                continue
            row_size = numel // rows
            parts.append(
                torch.arange(0, rows, step, dtype=torch.int64) * row_size + start
            )
        parts.append(torch.tensor([self.numel], dtype=torch.int64))
        return torch.cat(parts)

    @staticmethod
    def check_blocks(offsets: Union[torch.Tensor, Sequence[int]], numel: int) -> torch.Tensor:
        """Validate block boundaries for a buffer of ``numel`` elements.

        Args:
            offsets: 1-D int64 tensor, or a sequence of ints, that starts at 0,
                ends at ``numel`` and is non-decreasing.
            numel: Number of elements of the buffer being tiled.

        Returns:
            The boundaries as a contiguous 1-D ``torch.int64`` CPU tensor.

        Raises:
            ValueError: naming ``blocks`` when the boundaries are invalid.

        Example:
            >>> FlatLayout.check_blocks([0, 4, 10], 10).tolist()
            [0, 4, 10]
        """
        from ._validate import check_offsets

        return check_offsets(offsets, operator.index(numel), name="blocks")

    # ------------------------------------------------------------------
    # flatten / unflatten
    # ------------------------------------------------------------------
    def _resolve(self, tensors: Tensors, what: str = "tensors") -> list[torch.Tensor]:
        """Source tensors in layout order, with names and shapes checked."""
        if isinstance(tensors, torch.nn.Module):
            lookup: Mapping[str, Any] = _module_entries(tensors)
            source = "module"
        elif isinstance(tensors, Mapping):
            lookup = tensors
            source = "state dict"
        elif isinstance(tensors, torch.Tensor):
            raise TypeError(
                f"{what} must be a module, a state dict or a list of tensors, "
                "not a single tensor"
            )
        elif isinstance(tensors, Iterable):
            seq = list(tensors)
            if len(seq) != len(self):
                raise ValueError(
                    f"{what}: expected {len(self)} tensors in layout order, got {len(seq)}"
                )
            lookup = dict(zip(self.names, seq))
            source = "list"
        else:
            raise TypeError(
                f"{what} must be a module, a state dict or a list of tensors, "
                f"got {type(tensors).__name__}"
            )
        out: list[torch.Tensor] = []
        for name, shape in zip(self.names, self.shapes):
            if name not in lookup:
                raise ValueError(f"{what}: parameter {name!r} is missing from the {source}")
            t = lookup[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(
                    f"{what}: parameter {name!r} is not a tensor (got {type(t).__name__})"
                )
            if t.shape != shape:
                raise ValueError(
                    f"{what}: parameter {name!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)}"
                )
            out.append(t)
        return out

    def _check_flat(self, flat: Any, what: str = "flat") -> torch.Tensor:
        if not isinstance(flat, torch.Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(flat).__name__}")
        if flat.dim() != 1:
            raise ValueError(
                f"{what} must be 1-D, got shape {tuple(flat.shape)}"
            )
        if flat.numel() != self.numel:
            raise ValueError(
                f"{what} has {flat.numel()} elements, the layout needs {self.numel}"
            )
        if not flat.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
        return flat

    def flatten(
        self,
        tensors: Tensors,
        *,
        dtype: Optional[torch.dtype] = None,
        device: DeviceLike = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Copy ``tensors`` into one contiguous 1-D buffer (one copy each).

        Sources may be non-contiguous and of any dtype/device; they are
        converted while copying.  The result does not track gradients.

        Args:
            tensors: A module (parameters and buffers are looked up by name),
                a state dict, or a list of tensors in layout order.
            dtype: Buffer dtype.  Defaults to ``out.dtype``, else the promoted
                dtype of the sources, else :attr:`dtype`, else the default
                dtype.
            device: Buffer device.  Defaults to ``out.device``, else the device
                of the first source tensor, else CPU.
            out: Optional preallocated contiguous 1-D buffer of
                :attr:`numel` elements to write into.

        Returns:
            The flat buffer (``out`` when given).

        Raises:
            ValueError: naming the parameter when one is missing or has the
                wrong shape, or when ``out`` is unsuitable.

        Example:
            >>> m = torch.nn.Linear(3, 2)
            >>> flat = FlatLayout.from_module(m).flatten(m)
            >>> flat.shape
            torch.Size([8])
        """
        sources = self._resolve(tensors)
        if out is not None:
            self._check_flat(out, "out")
            if dtype is not None and out.dtype != dtype:
                raise ValueError(f"out has dtype {out.dtype}, but dtype={dtype} was requested")
            if device is not None and out.device != torch.device(device):
                raise ValueError(
                    f"out is on {out.device}, but device={device} was requested"
                )
            flat = out
        else:
            if dtype is None:
                dtype = _promoted_dtype(sources) or self.dtype or torch.get_default_dtype()
            if device is None:
                device = sources[0].device if sources else torch.device("cpu")
            flat = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for src, shape, start, n in zip(sources, self.shapes, self.offsets, self.numels):
                if n:
                    flat[start:start + n].view(shape).copy_(src)
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` as named tensors (no copies).

        Writing through a returned tensor changes ``flat`` and vice versa.

        Args:
            flat: Contiguous 1-D buffer of :attr:`numel` elements.

        Returns:
            ``dict`` mapping each name to a view of ``flat`` with its shape.

        Raises:
            ValueError: if ``flat`` is not 1-D, not contiguous, or has the
                wrong number of elements.

        Example:
            >>> layout = FlatLayout.from_shapes([("w", (2, 2)), ("s", ())])
            >>> views = layout.unflatten(torch.arange(5.0))
            >>> views["s"]
            tensor(4.)
        """
        self._check_flat(flat)
        return {
            name: flat[start:start + n].view(shape)
            for name, shape, start, n in zip(self.names, self.shapes, self.offsets, self.numels)
        }

    # ------------------------------------------------------------------
    # binding modules to a flat buffer
    # ------------------------------------------------------------------
    def bind(
        self,
        module: torch.nn.Module,
        flat: Optional[torch.Tensor] = None,
        *,
        copy: bool = True,
    ) -> torch.Tensor:
        """Make the module's tensors views of one flat buffer.

        Every parameter named in the layout is replaced by a new
        ``torch.nn.Parameter`` that is a view of its slice of ``flat``, so an
        in-place update of the parameter (e.g. an optimizer step) shows in the
        buffer and writing into the buffer changes the module.  ``requires_grad``
        and extra attributes of each parameter are kept, and every name a
        (tied) parameter is registered under gets the same new parameter, so
        ties are preserved.  Buffers named in the layout (see
        ``include_buffers``) are replaced by plain views.  Tensors not in the
        layout are left alone.

        Create optimizers *after* binding: they must reference the new
        parameters.  Existing ``.grad`` values are not carried over.  If
        ``flat`` has another dtype/device than the module, the bound tensors
        take ``flat``'s dtype/device.

        Args:
            module: Module whose tensors are described by this layout.
            flat: Buffer to bind to.  When None, a buffer with the promoted
                dtype and the device of the module's tensors is allocated and
                filled with the current values.
            copy: When ``flat`` is given, copy the module's current values into
                it (True) or keep ``flat``'s values (False).

        Returns:
            The flat buffer.

        Example:
            >>> m = torch.nn.Linear(3, 2)
            >>> layout = FlatLayout.from_module(m)
            >>> flat = layout.bind(m)
            >>> _ = flat.zero_()
            >>> bool((m.weight == 0).all())
            True
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        sources = self._resolve(module, "module")
        # Every (owner, attr) registration of each tensor object, so that tied
        # parameters are re-tied after binding.
        registrations: dict[int, list[tuple[torch.nn.Module, str, bool]]] = {}
        for _, sub in module.named_modules(remove_duplicate=False):
            for attr, p in sub._parameters.items():
                if p is not None:
                    registrations.setdefault(id(p), []).append((sub, attr, True))
            for attr, b in sub._buffers.items():
                if b is not None:
                    registrations.setdefault(id(b), []).append((sub, attr, False))
        seen: dict[int, str] = {}
        for name, src in zip(self.names, sources):
            if id(src) in seen:
                raise ValueError(
                    f"module: parameters {seen[id(src)]!r} and {name!r} are the same "
                    "(tied) tensor but have separate slots in the layout; build the "
                    "layout with FlatLayout.from_module"
                )
            seen[id(src)] = name

        if flat is None:
            dtype = _promoted_dtype(sources) or self.dtype or torch.get_default_dtype()
            device = sources[0].device if sources else torch.device("cpu")
            flat = torch.empty(self.numel, dtype=dtype, device=device)
            self.flatten(sources, out=flat)
        else:
            self._check_flat(flat)
            if copy:
                self.flatten(sources, out=flat)

        base = flat.detach()
        for src, shape, start, n in zip(sources, self.shapes, self.offsets, self.numels):
            view = base[start:start + n].view(shape)
            if isinstance(src, torch.nn.Parameter):
                new: torch.Tensor = torch.nn.Parameter(view, requires_grad=src.requires_grad)
                extra = getattr(src, "__dict__", None)
                if extra:
                    new.__dict__.update(extra)
            else:
                new = view
            for owner, attr, is_param in registrations.get(id(src), ()):
                if is_param:
                    owner._parameters[attr] = new
                else:
                    owner._buffers[attr] = new
        return flat

    def flat_grad(
        self,
        module: torch.nn.Module,
        *,
        dtype: Optional[torch.dtype] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Gradients of the module's parameters as one flat buffer (one copy).

        Entries whose tensor has no ``.grad`` (including buffers) are zero.

        Args:
            module: Module described by this layout.
            dtype: Buffer dtype (defaults to ``out.dtype``, else the promoted
                dtype of the parameters).
            out: Optional preallocated contiguous 1-D buffer.

        Returns:
            1-D tensor of :attr:`numel` gradient values, on the device of the
            module's first tensor (or of ``out``).

        Example:
            >>> m = torch.nn.Linear(3, 2)
            >>> m(torch.ones(1, 3)).sum().backward()
            >>> FlatLayout.from_module(m).flat_grad(m)[-2:]
            tensor([1., 1.])
        """
        sources = self._resolve(module, "module")
        if out is not None:
            self._check_flat(out, "out")
            if dtype is not None and out.dtype != dtype:
                raise ValueError(f"out has dtype {out.dtype}, but dtype={dtype} was requested")
            buf = out
        else:
            if dtype is None:
                dtype = _promoted_dtype(sources) or self.dtype or torch.get_default_dtype()
            device = sources[0].device if sources else torch.device("cpu")
            buf = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for src, shape, start, n in zip(sources, self.shapes, self.offsets, self.numels):
                if not n:
                    continue
                region = buf[start:start + n]
                grad = src.grad
                if grad is None:
                    region.zero_()
                else:
                    if grad.layout != torch.strided:
                        grad = grad.to_dense()
                    region.view(shape).copy_(grad)
        return buf

    # ------------------------------------------------------------------
    # serialisation
    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description of the layout.

        Returns:
            ``{"version": 1, "names": [...], "shapes": [[...], ...],
            "dtype": str | None}``.

        Example:
            >>> FlatLayout.from_shapes([("a", (2,))]).to_dict()["shapes"]
            [[2]]
        """
        return {
            "version": _FORMAT_VERSION,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtype": _dtype_to_str(self.dtype),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlatLayout":
        """Inverse of :meth:`to_dict`.

        Example:
            >>> layout = FlatLayout.from_shapes([("a", (2,))])
            >>> FlatLayout.from_dict(layout.to_dict()) == layout
            True
        """
        try:
            names = data["names"]
            shapes = data["shapes"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid layout dict: missing {exc}") from None
        version = data.get("version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported layout dict version {version!r}")
        return cls(tuple(names), tuple(tuple(s) for s in shapes), _dtype_from_str(data.get("dtype")))

    def save_safetensors(
        self,
        flat: torch.Tensor,
        path: Union[str, os.PathLike],
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Save ``flat`` as a safetensors file of separate named tensors.

        The layout (order included) is stored in the file metadata, so
        :meth:`load_safetensors` restores the exact same buffer.

        Args:
            flat: Flat buffer matching this layout.
            path: Destination file.
            metadata: Optional extra ``str -> str`` metadata.

        Example:
            >>> layout.save_safetensors(flat, "model.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        self._check_flat(flat)
        meta: dict[str, str] = {}
        if metadata:
            for k, v in metadata.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ValueError("metadata must map str to str")
                if k == _LAYOUT_METADATA_KEY:
                    raise ValueError(f"metadata key {k!r} is reserved")
                meta[k] = v
        meta[_LAYOUT_METADATA_KEY] = json.dumps(self.to_dict())
        # safetensors refuses tensors sharing memory, so store copies.
        tensors = {
            name: view.detach().clone(memory_format=torch.contiguous_format).cpu()
            for name, view in self.unflatten(flat).items()
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load_safetensors(
        cls,
        path: Union[str, os.PathLike],
        *,
        device: DeviceLike = "cpu",
        dtype: Optional[torch.dtype] = None,
    ) -> tuple["FlatLayout", torch.Tensor]:
        """Load a safetensors file into a flat buffer.

        Files written by :meth:`save_safetensors` keep their original order;
        other files use the order of the file's keys.

        Args:
            path: Source file.
            device: Device of the returned buffer.
            dtype: Buffer dtype (defaults to the recorded layout dtype, else
                the promoted dtype of the stored tensors).

        Returns:
            ``(layout, flat)``.

        Example:
            >>> layout, flat = FlatLayout.load_safetensors("model.safetensors")  # doctest: +SKIP
        """
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if _LAYOUT_METADATA_KEY in meta:
                layout = cls.from_dict(json.loads(meta[_LAYOUT_METADATA_KEY]))
                missing = [n for n in layout.names if n not in keys]
                if missing:
                    raise ValueError(
                        f"path: tensors {missing[:5]} listed in the layout are missing from the file"
                    )
            else:
                layout = cls.from_shapes(
                    [(k, f.get_slice(k).get_shape()) for k in keys]
                )
            if dtype is None:
                dtype = layout.dtype
            if dtype is None:
                stored = [_SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()) for k in layout.names]
                if stored and all(d is not None for d in stored):
                    dtype = functools.reduce(torch.promote_types, stored)
                else:
                    dtype = torch.get_default_dtype()
            flat = torch.empty(layout.numel, dtype=dtype, device=device)
            with torch.no_grad():
                for name, shape, start, n in zip(
                    layout.names, layout.shapes, layout.offsets, layout.numels
                ):
                    t = f.get_tensor(name)
                    if t.shape != shape:
                        raise ValueError(
                            f"path: tensor {name!r} has shape {tuple(t.shape)}, "
                            f"expected {tuple(shape)}"
                        )
                    if n:
                        flat[start:start + n].view(shape).copy_(t)
        if layout.dtype is None:
            layout = cls(layout.names, layout.shapes, dtype)
        return layout, flat


def flatten_module(
    module: torch.nn.Module,
    *,
    include_buffers: bool = False,
    requires_grad_only: bool = False,
    dtype: Optional[torch.dtype] = None,
    device: DeviceLike = None,
) -> tuple[FlatLayout, torch.Tensor]:
    """Layout of ``module`` and a flat copy of its tensors.

    Args:
        module: The module.
        include_buffers: See :meth:`FlatLayout.from_module`.
        requires_grad_only: See :meth:`FlatLayout.from_module`.
        dtype: See :meth:`FlatLayout.flatten`.
        device: See :meth:`FlatLayout.flatten`.

    Returns:
        ``(layout, flat)``.

    Example:
        >>> layout, flat = flatten_module(torch.nn.Linear(3, 2))
        >>> flat.numel()
        8
    """
    layout = FlatLayout.from_module(
        module, include_buffers=include_buffers, requires_grad_only=requires_grad_only
    )
    return layout, layout.flatten(module, dtype=dtype, device=device)


def layout_of(obj: Any) -> FlatLayout:
    """Layout of a module, state dict, layout, or ``(name, shape)`` pairs.

    Args:
        obj: A ``FlatLayout`` (returned as is), a ``torch.nn.Module``
            (parameters only), a mapping of tensors (state dict), a mapping of
            names to shapes, or an iterable of ``(name, shape)`` pairs.

    Returns:
        The layout.

    Example:
        >>> layout_of({"a": torch.zeros(2, 2)}).numel
        4
    """
    if isinstance(obj, FlatLayout):
        return obj
    if isinstance(obj, torch.nn.Module):
        return FlatLayout.from_module(obj)
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if any(isinstance(v, torch.Tensor) for v in values):
            return FlatLayout.from_state_dict(obj)
        return FlatLayout.from_shapes(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, torch.Tensor)):
        return FlatLayout.from_shapes(obj)
    raise TypeError(f"cannot derive a FlatLayout from {type(obj).__name__}")
