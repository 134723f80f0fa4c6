"""Tests for the flat-buffer layer (fastmerge.flat)."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from fastmerge.flat import FlatLayout, flatten_module, layout_of


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

MIXED_SHAPES = [
    ("scalar", ()),
    ("one", (1,)),
    ("prime", (13,)),
    ("matrix", (7, 5)),
    ("cube", (3, 2, 4)),
    ("single_row", (1, 11)),
    ("empty", (0, 3)),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mixed_state(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g).to(dtype) for name, shape in MIXED_SHAPES
    }


def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight  # tie

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.embed(idx))))


def _storage_ptr(t):
    return t.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------
# layout basics
# ---------------------------------------------------------------------------


def test_layout_attributes():
    layout = FlatLayout.from_shapes(MIXED_SHAPES, dtype=torch.float32)
    numels = [1, 1, 13, 35, 24, 11, 0]
    assert layout.names == tuple(n for n, _ in MIXED_SHAPES)
    assert all(isinstance(s, torch.Size) for s in layout.shapes)
    assert layout.shapes[0] == torch.Size([])
    assert layout.numels == tuple(numels)
    assert layout.offsets[0] == 0 and layout.offsets[-1] == layout.numel == sum(numels)
    assert len(layout.offsets) == len(layout) + 1 == len(MIXED_SHAPES) + 1
    assert all(type(o) is int for o in layout.offsets)
    assert list(layout) == list(layout.names)
    assert "prime" in layout and "nope" not in layout
    assert layout.index("matrix") == 3
    assert layout.slice("prime") == slice(2, 15)
    assert layout.slice("empty") == slice(layout.numel, layout.numel)
    with pytest.raises(KeyError, match="nope"):
        layout.index("nope")
    r = repr(layout)
    assert "FlatLayout" in r and str(layout.numel) in r and len(r) < 200


def test_layout_equality_hash_and_immutability():
    a = FlatLayout.from_shapes(MIXED_SHAPES, dtype=torch.float32)
    b = FlatLayout.from_shapes([(n, list(s)) for n, s in MIXED_SHAPES], dtype=torch.bfloat16)
    c = FlatLayout.from_shapes(MIXED_SHAPES[:-1])
    assert a == b and hash(a) == hash(b)  # dtype is not part of equality
    assert a != c
    assert len({a, b, c}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'names'"):
        a.names = ("x",)


def test_layout_rejects_duplicates_and_negative_dims():
    with pytest.raises(ValueError, match="duplicate"):
        FlatLayout.from_shapes([("a", (1,)), ("a", (2,))])
    with pytest.raises(ValueError, match="'a'"):
        FlatLayout.from_shapes([("a", (-1,))])


def test_large_offsets_are_python_ints():
    big = 2**31 + 7
    layout = FlatLayout.from_shapes([("a", (big,)), ("b", (3, big))])
    assert layout.numel == 4 * big
    assert layout.offsets == (0, big, 4 * big)
    blocks = layout.block_offsets("tensor")
    assert blocks.dtype == torch.int64 and blocks.tolist() == [0, big, 4 * big]
    rows = layout.block_offsets("row")
    assert rows.tolist() == [0, big, 2 * big, 3 * big, 4 * big]


# ---------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------


def test_from_state_dict_equals_from_module():
    model = _small_mlp()
    a = FlatLayout.from_module(model)
    b = FlatLayout.from_state_dict(model.state_dict())
    assert a == b
    assert a.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert a.dtype == b.dtype == torch.float32


def test_from_state_dict_skips_non_tensors_and_dedupes_ties():
    sd = {"a": torch.zeros(2), "meta": "hello", "n": 3, "b": torch.zeros(1, 2)}
    layout = FlatLayout.from_state_dict(sd)
    assert layout.names == ("a", "b")

    tied = _Tied()
    assert FlatLayout.from_state_dict(tied.state_dict()) == FlatLayout.from_module(tied)
    full = FlatLayout.from_state_dict(tied.state_dict(), dedupe_tied=False)
    assert "head.weight" in full and len(full) == len(FlatLayout.from_module(tied)) + 1


def test_from_module_options():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)
    all_params = FlatLayout.from_module(model)
    assert all_params.names == ("0.weight", "0.bias", "1.weight", "1.bias")
    trainable = FlatLayout.from_module(model, requires_grad_only=True)
    assert trainable.names == ("0.weight", "1.weight", "1.bias")
    with_buffers = FlatLayout.from_module(model, include_buffers=True)
    assert with_buffers.names[4:] == (
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    )
    assert with_buffers.dtype is None  # float32 params + int64 counter
    assert with_buffers == FlatLayout.from_state_dict(model.state_dict())


def test_layout_of_and_flatten_module():
    model = _small_mlp()
    layout, flat = flatten_module(model)
    # Linear(5, 7), ReLU, Linear(7, 3): the names and shapes written out
    mlp_names = ("0.weight", "0.bias", "2.weight", "2.bias")
    mlp_shapes = ((7, 5), (7,), (3, 7), (3,))
    for got in (layout, layout_of(model), layout_of(model.state_dict())):
        assert got.names == mlp_names
        assert tuple(tuple(s) for s in got.shapes) == mlp_shapes
        assert got.numel == 35 + 7 + 21 + 3
    assert layout_of(layout) is layout
    mixed_names = ("scalar", "one", "prime", "matrix", "cube", "single_row", "empty")
    mixed_shapes = ((), (1,), (13,), (7, 5), (3, 2, 4), (1, 11), (0, 3))
    for got in (layout_of(MIXED_SHAPES), layout_of(dict(MIXED_SHAPES))):
        assert got.names == mixed_names
        assert tuple(tuple(s) for s in got.shapes) == mixed_shapes
        assert got.offsets == (0, 1, 2, 15, 50, 74, 85, 85)
    assert flat.numel() == 66
    with pytest.raises(TypeError, match="cannot derive a FlatLayout from int"):
        layout_of(42)


def test_to_dict_from_dict_json_round_trip():
    layout = FlatLayout.from_shapes(MIXED_SHAPES, dtype=torch.bfloat16)
    text = json.dumps(layout.to_dict())
    back = FlatLayout.from_dict(json.loads(text))
    assert back == layout
    assert back.dtype == torch.bfloat16
    assert back.offsets == layout.offsets


# ---------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_mixed_shapes(dtype):
    state = _mixed_state(dtype)
    layout = FlatLayout.from_state_dict(state)
    assert layout.dtype == dtype
    flat = layout.flatten(state)
    assert flat.dim() == 1 and flat.is_contiguous()
    assert flat.dtype == dtype and flat.numel() == layout.numel
    back = layout.unflatten(flat)
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].shape == t.shape
        assert back[name].dtype == dtype
        assert torch.equal(back[name], t)
    # the flat buffer is the concatenation of the raveled tensors
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in state.values()]))
    # list input in layout order gives the same buffer
    assert torch.equal(layout.flatten(list(state.values())), flat)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flatten_dtype_conversion_and_out(dtype):
    state = _mixed_state(torch.float32)
    layout = FlatLayout.from_state_dict(state)
    flat = layout.flatten(state, dtype=dtype)
    assert flat.dtype == dtype
    for name, t in layout.unflatten(flat).items():
        assert torch.equal(t, state[name].to(dtype))
    out = torch.full((layout.numel,), float("nan"), dtype=dtype)
    res = layout.flatten(state, out=out)
    assert res is out and torch.equal(out, flat)


def test_unflatten_returns_views():
    state = _mixed_state()
    layout = FlatLayout.from_state_dict(state)
    flat = layout.flatten(state)
    views = layout.unflatten(flat)
    for name, v in views.items():
        assert _storage_ptr(v) == _storage_ptr(flat)
        if v.numel():
            start = layout.offsets[layout.index(name)]
            assert v.data_ptr() == flat.data_ptr() + start * flat.element_size()
    # buffer -> dict
    flat[layout.slice("prime")] = 42.0
    assert torch.all(views["prime"] == 42.0)
    flat[layout.slice("scalar")] = -1.0
    assert views["scalar"].item() == -1.0
    # dict -> buffer
    views["matrix"][2, 3] = 123.0
    assert flat[layout.offsets[layout.index("matrix")] + 2 * 5 + 3].item() == 123.0
    views["cube"].zero_()
    assert torch.all(flat[layout.slice("cube")] == 0)


def test_flatten_non_contiguous_sources():
    base = torch.arange(35.0).reshape(5, 7)
    transposed = base.t()  # (7, 5), non-contiguous
    strided = torch.arange(26.0)[::2]  # (13,), non-contiguous
    expanded = torch.tensor([3.0]).expand(1, 11)  # stride 0
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    state = _mixed_state()
    state["matrix"] = transposed
    state["prime"] = strided
    state["single_row"] = expanded
    layout = FlatLayout.from_shapes(MIXED_SHAPES)
    flat = layout.flatten(state)
    assert torch.equal(flat[layout.slice("matrix")], transposed.contiguous().reshape(-1))
    assert torch.equal(flat[layout.slice("prime")], strided.contiguous())
    back = layout.unflatten(flat)
    assert torch.equal(back["matrix"], transposed)
    assert torch.equal(back["prime"], strided)
    assert torch.equal(back["single_row"], expanded)


def test_flatten_errors_name_the_parameter():
    state = _mixed_state()
    layout = FlatLayout.from_state_dict(state)
    bad = dict(state)
    bad["matrix"] = torch.zeros(5, 7)
    with pytest.raises(ValueError, match="'matrix'.*shape"):
        layout.flatten(bad)
    missing = dict(state)
    del missing["prime"]
    with pytest.raises(ValueError, match="'prime'.*missing"):
        layout.flatten(missing)
    with pytest.raises(ValueError, match="expected 7 tensors"):
        layout.flatten(list(state.values())[:-1])
    model = _small_mlp()
    other = FlatLayout.from_shapes([("0.weight", (7, 5)), ("1.weight", (3,))])
    with pytest.raises(ValueError, match="'1.weight'.*missing"):
        other.flatten(model)
    with pytest.raises(ValueError, match="out"):
        layout.flatten(state, out=torch.empty(layout.numel + 1))
    with pytest.raises(ValueError, match="out"):
        layout.flatten(state, out=torch.empty(layout.numel, dtype=torch.float16), dtype=torch.float32)


def test_unflatten_errors():
    layout = FlatLayout.from_shapes(MIXED_SHAPES)
    n = layout.numel
    with pytest.raises(ValueError, match="flat"):
        layout.unflatten(torch.zeros(n + 1))
    with pytest.raises(ValueError, match="flat.*1-D"):
        layout.unflatten(torch.zeros(1, n))
    with pytest.raises(ValueError, match="flat.*contiguous"):
        layout.unflatten(torch.zeros(2 * n)[::2])


# ---------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------


def _assert_tiles(blocks, numel):
    assert blocks.dtype == torch.int64 and blocks.dim() == 1
    assert blocks[0].item() == 0 and blocks[-1].item() == numel
    assert bool((blocks[1:] >= blocks[:-1]).all())
    assert torch.equal(FlatLayout.check_blocks(blocks, numel), blocks)


def test_block_offsets_kinds():
    layout = FlatLayout.from_shapes(MIXED_SHAPES)
    n = layout.numel

    tensor_blocks = layout.block_offsets()
    _assert_tiles(tensor_blocks, n)
    assert tensor_blocks.tolist() == list(layout.offsets)
    assert torch.equal(layout.block_offsets("tensor"), tensor_blocks)

    global_blocks = layout.block_offsets("global")
    _assert_tiles(global_blocks, n)
    assert global_blocks.tolist() == [0, n]

    rows = layout.block_offsets("row")
    _assert_tiles(rows, n)
    # scalar, size-1, prime: one block each; matrix 7 rows; cube 3 rows;
    # single_row 1 row; empty (0 rows) no block.
    assert rows.numel() - 1 == 1 + 1 + 1 + 7 + 3 + 1
    sizes = (rows[1:] - rows[:-1]).tolist()
    assert sizes == [1, 1, 13] + [5] * 7 + [8] * 3 + [11]
    # every tensor boundary is also a row boundary
    assert set(layout.offsets) <= set(rows.tolist())

    grouped = layout.block_offsets("row", row_block=3)
    _assert_tiles(grouped, n)
    sizes = (grouped[1:] - grouped[:-1]).tolist()
    assert sizes == [1, 1, 13, 15, 15, 5, 24, 11]

    with pytest.raises(ValueError, match="kind"):
        layout.block_offsets("column")
    with pytest.raises(ValueError, match="row_block"):
        layout.block_offsets("row", row_block=0)
    with pytest.raises(ValueError, match="row_block"):
        layout.block_offsets("tensor", row_block=2)


def test_check_blocks_accepts_lists_and_tensors():
    out = FlatLayout.check_blocks([0, 3, 3, 10], 10)
    assert out.dtype == torch.int64 and out.tolist() == [0, 3, 3, 10]
    t = torch.tensor([0, 10], dtype=torch.int64)
    assert torch.equal(FlatLayout.check_blocks(t, 10), t)
    assert FlatLayout.check_blocks([0, 0], 0).tolist() == [0, 0]


@pytest.mark.parametrize(
    "blocks, why",
    [
        ([1, 5, 10], "the first offset is 1"),
        (torch.tensor([0, 5, 9]), "the last offset is 9"),
        ([0, 6, 4, 10], "offsets decrease at block 1"),
        (torch.tensor([0.0, 5.0, 10.0]), "int64"),
        ([0.0, 10.0], "int64"),
        (torch.tensor([0, 5, 10], dtype=torch.int32), "int64"),
        (torch.tensor([[0, 5], [5, 10]]), "1-D"),
        ([[0, 5], [5, 10]], "1-D"),
        ([], "at least two"),
    ],
    ids=[
        "not-start-0",
        "not-end-numel",
        "decreasing",
        "float-tensor",
        "float-list",
        "int32",
        "2d-tensor",
        "2d-list",
        "empty",
    ],
)
def test_check_blocks_errors(blocks, why):
    with pytest.raises(ValueError, match="blocks") as info:
        FlatLayout.check_blocks(blocks, 10)
    assert why in str(info.value)


# ---------------------------------------------------------------------------
# bind
# ---------------------------------------------------------------------------


def _assert_bound(module, layout, flat):
    params = dict(module.named_parameters())
    for name in layout:
        p = params[name]
        assert isinstance(p, nn.Parameter)
        assert _storage_ptr(p) == _storage_ptr(flat)
        start = layout.offsets[layout.index(name)]
        assert p.data_ptr() == flat.data_ptr() + start * flat.element_size()


def test_bind_sgd_step_updates_buffer_in_place():
    model = _small_mlp()
    x = torch.randn(4, 5)
    before = model(x).detach()
    layout = FlatLayout.from_module(model)
    reference = layout.flatten(model)
    flat = layout.bind(model)
    _assert_bound(model, layout, flat)
    assert torch.equal(flat, reference)
    assert torch.equal(model(x).detach(), before)
    assert all(p.requires_grad for p in model.parameters())

    ptr = flat.data_ptr()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).sum().backward()
    grad = layout.flat_grad(model)
    opt.step()
    assert flat.data_ptr() == ptr
    assert not torch.equal(flat, reference)
    torch.testing.assert_close(flat, reference - 0.1 * grad)
    # the module still reads the buffer after the step
    _assert_bound(model, layout, flat)
    assert torch.equal(layout.flatten(model), flat)

    # writing to the buffer changes the module output
    with torch.no_grad():
        flat.zero_()
        flat[layout.slice("2.bias")] = torch.tensor([1.0, 2.0, 3.0])
        out = model(x)
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 3.0]]).expand(4, 3))


def test_bind_given_buffer_copy_true_and_false():
    model = _small_mlp()
    layout = FlatLayout.from_module(model)
    values = layout.flatten(model)

    target = torch.zeros(layout.numel)
    res = layout.bind(model, target)  # copy=True: module values -> target
    assert res is target and torch.equal(target, values)
    _assert_bound(model, layout, target)

    other = _small_mlp()
    new_values = torch.randn(layout.numel)
    buf = new_values.clone()
    layout.bind(other, buf, copy=False)  # keep the buffer's values
    assert torch.equal(buf, new_values)
    assert torch.equal(layout.flatten(other), new_values)
    _assert_bound(other, layout, buf)

    with pytest.raises(ValueError, match="flat"):
        layout.bind(other, torch.zeros(layout.numel + 1))


def test_bind_preserves_requires_grad_and_flat_grad():
    model = _small_mlp()
    model[0].bias.requires_grad_(False)
    layout = FlatLayout.from_module(model)
    flat = layout.bind(model)
    assert model[0].bias.requires_grad is False
    assert model[0].weight.requires_grad is True
    model(torch.randn(2, 5)).sum().backward()
    assert model[0].bias.grad is None
    g = layout.flat_grad(model)
    assert g.shape == flat.shape and g.dtype == flat.dtype
    assert torch.all(g[layout.slice("0.bias")] == 0)
    assert torch.equal(g[layout.slice("2.bias")], torch.full((3,), 2.0))
    assert torch.equal(g[layout.slice("0.weight")], model[0].weight.grad.reshape(-1))


def test_bind_keeps_tied_weights_tied():
    model = _Tied()
    layout = FlatLayout.from_module(model)
    assert "head.weight" not in layout and "embed.weight" in layout
    flat = layout.bind(model)
    assert model.head.weight is model.embed.weight
    _assert_bound(model, layout, flat)
    idx = torch.tensor([0, 3, 5])
    before = flat.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx).square().mean().backward()
    opt.step()
    assert model.head.weight is model.embed.weight
    assert not torch.equal(flat[layout.slice("embed.weight")], before[layout.slice("embed.weight")])
    with torch.no_grad():
        flat[layout.slice("embed.weight")] = 7.0
    assert torch.all(model.head.weight == 7.0)
    assert torch.all(model.embed.weight == 7.0)


def test_bind_with_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layout = FlatLayout.from_module(model, include_buffers=True)
    flat = layout.bind(model, torch.empty(layout.numel))
    model.train()
    model(torch.randn(8, 3))  # updates running stats in place
    assert torch.equal(flat[layout.slice("1.running_mean")], model[1].running_mean)
    assert not torch.all(flat[layout.slice("1.running_mean")] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bind_low_precision(dtype):
    model = _small_mlp().to(dtype)
    layout = FlatLayout.from_module(model)
    assert layout.dtype == dtype
    flat = layout.bind(model)
    assert flat.dtype == dtype
    _assert_bound(model, layout, flat)


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_safetensors_round_trip(tmp_path, dtype):
    state = _mixed_state(dtype)
    layout = FlatLayout.from_state_dict(state)
    flat = layout.flatten(state)
    path = tmp_path / "model.safetensors"
    layout.save_safetensors(flat, path, metadata={"note": "hi"})
    # the file holds ordinary named tensors
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert set(stored) == set(layout.names)
    assert torch.equal(stored["matrix"], state["matrix"])

    layout2, flat2 = FlatLayout.load_safetensors(path)
    assert layout2 == layout  # order is preserved, not alphabetical
    assert layout2.names == layout.names
    assert flat2.dtype == dtype
    assert torch.equal(flat2, flat)


def test_load_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"b": torch.ones(2, 2), "a": torch.zeros(3)}, str(path))
    layout, flat = FlatLayout.load_safetensors(path)
    assert set(layout.names) == {"a", "b"}
    assert flat.numel() == 7
    assert torch.equal(layout.unflatten(flat)["b"], torch.ones(2, 2))


# ---------------------------------------------------------------------------
# real model: open_clip ViT-B-32 vision tower
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b32():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.eval()
    return model


def test_open_clip_vit_b32_visual_round_trip(vit_b32):
    visual = vit_b32.visual
    n_params = sum(p.numel() for p in visual.parameters())
    layout, flat = flatten_module(visual)
    assert layout.numel == n_params, (layout.numel, n_params)
    assert 87_000_000 < n_params < 88_500_000  # ~87.8 M
    assert flat.numel() == n_params

    # flatten / unflatten round trip on the real parameters
    views = layout.unflatten(flat)
    for name, p in visual.named_parameters():
        assert torch.equal(views[name], p)

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = visual(x)

    bound = layout.bind(visual)
    assert torch.equal(bound, flat)
    _assert_bound(visual, layout, bound)
    assert all(
        _storage_ptr(p) == _storage_ptr(bound) for p in visual.parameters()
    )
    with torch.no_grad():
        after = visual(x)
    assert torch.equal(before, after)

    # scaling the buffer in place is seen by the model
    with torch.no_grad():
        bound[layout.slice("proj")] *= 2
        scaled = visual(x)
    torch.testing.assert_close(scaled, 2 * before)
