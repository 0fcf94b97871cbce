"""Input specs of real programs, data files checked against them, splits and sampled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor.errors import DataError
from compressor.load.data import (
    Dataset,
    InputSpec,
    call_arguments,
    input_specs,
    load_data,
    synthesize_data,
)
from compressor.load.program import load_program
from tests.support import tiny_models
from tests.support.tiny_models import TinyTextEncoder, example_inputs, make_pt2


class Gate(nn.Module):
    """A float input and a bool mask, exported with positional arguments."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return x * keep.to(x.dtype)


def _gate_program(path: Path) -> Path:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[True, False, True]] * 4 + [[False, False, True]])
    batch = torch.export.Dim("batch")
    program = torch.export.export(Gate(), (x, keep), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))
    return path


def _text_dynamic_seq(path: Path) -> Path:
    torch.manual_seed(0)
    model = TinyTextEncoder().eval()
    inputs = example_inputs(model)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=512)}
    program = torch.export.export(model, (), kwargs=inputs,
                                  dynamic_shapes={name: dims for name in inputs})
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def program_paths(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model exported and saved, by name."""
    folder = tmp_path_factory.mktemp("programs")
    paths = {kind: make_pt2(kind, folder / f"{kind}.pt2") for kind in ("mlp", "conv", "text")}
    paths["gate"] = _gate_program(folder / "gate.pt2")
    paths["text_seq"] = _text_dynamic_seq(folder / "text_seq.pt2")
    return paths


@pytest.fixture(scope="module")
def programs(program_paths):
    """Each saved program loaded back, by name."""
    return {name: load_program(path) for name, path in program_paths.items()}


@pytest.fixture(scope="module")
def specs(programs):
    return {name: input_specs(program) for name, program in programs.items()}


def _examples(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = {"mlp": "TinyMLP", "conv": "TinyConvNet", "text": "TinyTextEncoder"}[kind]
    return example_inputs(getattr(tiny_models, model)())


# -- input_specs ------------------------------------------------------------------------------


SPEC_TABLE = [
    ("mlp", [("x", (None, 32), torch.float32)]),
    ("conv", [("image", (None, 1, 12, 12), torch.float32)]),
    ("text", [("input_ids", (None, 8), torch.int64), ("attention_mask", (None, 8), torch.int64)]),
    ("text_seq", [("input_ids", (None, None), torch.int64),
                  ("attention_mask", (None, None), torch.int64)]),
    ("gate", [("x", (None, 3), torch.float32), ("keep", (None, 3), torch.bool)]),
]


@pytest.mark.parametrize(("kind", "expected"), SPEC_TABLE, ids=[c[0] for c in SPEC_TABLE])
def test_specs_name_shape_and_dtype_every_input_in_order(specs, kind, expected):
    assert [(s.name, s.shape, s.dtype) for s in specs[kind]] == expected


@pytest.mark.parametrize("kind", ["mlp", "conv", "text"])
def test_spec_statistics_are_those_of_the_example_inputs(specs, kind):
    examples = _examples(kind)
    for spec in specs[kind]:
        example = examples[spec.name].double()
        assert spec.example_shape == tuple(example.shape)
        assert (spec.low, spec.high) == (example.min().item(), example.max().item())
        if spec.dtype.is_floating_point:
            assert spec.mean == pytest.approx(example.mean().item())
            assert spec.std == pytest.approx(example.std().item())
        else:
            assert spec.mean is None and spec.std is None


def test_text_mask_range_and_bool_rate(specs):
    ids, mask = specs["text"]
    assert 0 <= ids.low < ids.high <= 63
    assert (mask.low, mask.high) == (0, 1)
    keep = specs["gate"][1]
    assert keep.mean == pytest.approx(9 / 15)


def test_program_without_example_inputs_uses_shape_hints(program_paths):
    program = load_program(program_paths["text"])
    program.example_inputs = None
    ids, mask = input_specs(program)
    assert ids.low is None and ids.mean is None
    assert ids.example_shape == (4, 8)  # the batch symbol's hint, the static seq length


# -- load_data: good files ----------------------------------------------------------------------


def _write(path: Path, tensors: dict[str, torch.Tensor | np.ndarray]) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **{k: np.asarray(v) for k, v in tensors.items()})
    else:
        save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_npz_and_safetensors_load_the_same_data(specs, tmp_path, suffix):
    ids = torch.randint(0, 64, (10, 8))
    mask = torch.ones(10, 8, dtype=torch.int64)
    data = load_data(_write(tmp_path / f"d{suffix}", {"attention_mask": mask, "input_ids": ids}),
                     specs["text"], max_samples=100)
    assert list(data.inputs) == ["input_ids", "attention_mask"]  # the program's order
    assert torch.equal(data.inputs["input_ids"], ids) and torch.equal(data.inputs["attention_mask"],
                                                                       mask)
    assert (len(data), data.synthetic, data.source) == (10, False, f"d{suffix}")


CASTS = [
    ("float64_to_float32", "mlp", {"x": np.linspace(0, 1, 64).reshape(2, 32)}, torch.float32),
    ("int_to_float", "mlp", {"x": np.arange(64, dtype=np.int16).reshape(2, 32)}, torch.float32),
    ("big_endian", "mlp", {"x": np.ones((2, 32), dtype=">f4")}, torch.float32),
    ("int32_to_int64", "text", {"input_ids": np.full((3, 8), 63, np.int32),
                                "attention_mask": np.ones((3, 8), np.int32)}, torch.int64),
    ("bool_mask_to_int64", "text", {"input_ids": np.zeros((3, 8), np.int64),
                                    "attention_mask": np.ones((3, 8), bool)}, torch.int64),
    ("int01_to_bool", "gate", {"x": np.zeros((2, 3), np.float32),
                               "keep": np.array([[0, 1, 1], [1, 0, 0]], np.uint8)}, None),
]


@pytest.mark.parametrize(("kind", "arrays", "dtype"), [c[1:] for c in CASTS],
                         ids=[c[0] for c in CASTS])
def test_data_is_cast_to_the_program_dtypes(specs, tmp_path, kind, arrays, dtype):
    data = load_data(_write(tmp_path / "d.npz", arrays), specs[kind], max_samples=100)
    for spec in specs[kind]:
        tensor = data.inputs[spec.name]
        assert tensor.dtype == spec.dtype and (dtype is None or tensor.dtype == dtype)
        want = torch.from_numpy(np.asarray(arrays[spec.name], dtype=np.float64)).to(spec.dtype)
        assert torch.equal(tensor, want)


def test_integers_outside_the_example_range_are_kept(specs, tmp_path):
    ids = np.full((4, 8), 1000, np.int64)  # the example shows ids < 64 only
    data = load_data(_write(tmp_path / "d.npz", {"input_ids": ids,
                                                 "attention_mask": np.ones((4, 8), np.int64)}),
                     specs["text"], max_samples=100)
    assert int(data.inputs["input_ids"].max()) == 1000


def test_at_most_max_samples_rows_are_kept(specs, tmp_path):
    x = torch.arange(20 * 32, dtype=torch.float32).reshape(20, 32)
    data = load_data(_write(tmp_path / "d.safetensors", {"x": x}), specs["mlp"], max_samples=8)
    assert torch.equal(data.inputs["x"], x[:8])


def test_dynamic_non_batch_dims_take_any_size(specs, tmp_path):
    arrays = {"input_ids": np.zeros((3, 5), np.int64), "attention_mask": np.ones((3, 5), np.int64)}
    data = load_data(_write(tmp_path / "d.npz", arrays), specs["text_seq"], max_samples=100)
    assert data.inputs["input_ids"].shape == (3, 5)


# -- load_data: bad files -------------------------------------------------------------------------


def _raw(content: bytes):
    return lambda path: path.write_bytes(content)


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def _text(n_ids: int = 4, n_mask: int = 4, ids_dtype=np.int64, seq: int = 8):
    return _npz(input_ids=np.zeros((n_ids, seq), ids_dtype),
                attention_mask=np.ones((n_mask, seq), np.int64))


def _mlp_x(x: np.ndarray):
    return _npz(x=x)


def _with(value: float, row: int) -> np.ndarray:
    x = np.zeros((5, 32), np.float64)
    x[row, 7] = value
    return x


BAD_FILES = [
    ("unknown_type", "mlp", "d.csv", _raw(b"x\n1\n"), ["unknown type '.csv'", ".safetensors"]),
    ("corrupt_safetensors", "mlp", "d.safetensors", _raw(b"\x10\x00garbage"),
     ["not a readable .safetensors"]),
    ("corrupt_npz", "mlp", "d.npz", _raw(b"PK\x03\x04garbage"), ["not a readable .npz"]),
    ("npz_needs_pickle", "mlp", "d.npz", _npz(x=np.array([{"a": 1}, None], dtype=object)),
     ["pickled objects", "never loaded"]),
    ("single_npy", "mlp", "d.npz", lambda p: np.save(p.open("wb"), np.zeros((4, 32))),
     ["single .npy array"]),
    ("non_numeric", "mlp", "d.npz", _npz(x=np.array([["a"] * 32] * 4)),
     ["tensor 'x'", "non-numeric dtype <U1"]),
    ("missing_input", "text", "d.npz", _npz(input_ids=np.zeros((4, 8), np.int64)),
     ["input(s) ['attention_mask']", "['input_ids']", "['input_ids', 'attention_mask']"]),
    ("extra_tensor", "mlp", "d.npz", _npz(x=np.zeros((4, 32)), labels=np.zeros(4)),
     ["['labels']", "not program inputs", "['x']"]),
    ("sample_counts", "text", "d.npz", _text(n_ids=10, n_mask=9),
     ["different sample counts", "'input_ids': 10", "'attention_mask': 9"]),
    ("one_sample", "mlp", "d.npz", _mlp_x(np.zeros((1, 32))), ["holds 1 sample(s)", "at least 2"]),
    ("scalar", "mlp", "d.npz", _mlp_x(np.float32(1.0)), ["['x'] are scalars"]),
    ("static_dim", "mlp", "d.npz", _mlp_x(np.zeros((4, 31))),
     ["tensor 'x' has shape (4, 31)", "is (batch, 32)"]),
    ("rank", "conv", "d.npz", _npz(image=np.zeros((4, 144), np.float32)),
     ["tensor 'image' has shape (4, 144)", "is (batch, 1, 12, 12)"]),
    ("float_for_int", "text", "d.npz", _text(ids_dtype=np.float32),
     ["tensor 'input_ids' holds float data (torch.float32)", "input is torch.int64",
      "astype(numpy.int64)"]),
    ("nan", "mlp", "d.npz", _mlp_x(_with(np.nan, 3)), ["tensor 'x' contains 1 NaN", "row 3"]),
    ("inf", "mlp", "d.npz", _mlp_x(_with(-np.inf, 2)), ["1 NaN or infinite", "row 2"]),
    ("float32_overflow", "mlp", "d.npz", _mlp_x(_with(1e300, 4)),
     ["as torch.float32", "row 4"]),
    ("int_for_bool", "gate", "d.npz", _npz(x=np.zeros((2, 3), np.float32),
                                           keep=np.full((2, 3), 2, np.int64)),
     ["tensor 'keep'", "values other than 0 and 1", "input is bool"]),
    ("float_for_bool", "gate", "d.npz", _npz(x=np.zeros((2, 3), np.float32),
                                             keep=np.ones((2, 3), np.float32)),
     ["tensor 'keep' holds float data", "save it as booleans", "numpy.bool_"]),
]


@pytest.mark.parametrize(("kind", "name", "write", "fragments"), [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_data_files_are_refused(specs, tmp_path, kind, name, write, fragments):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as caught:
        load_data(path, specs[kind], max_samples=100)
    message = caught.value.message
    assert name in message or "max_samples" in message
    for fragment in fragments:
        assert fragment in message


def test_int_too_large_for_the_input_dtype_is_refused(tmp_path):
    spec = InputSpec("ids", (None, 2), torch.int32)
    path = _write(tmp_path / "d.npz", {"ids": np.array([[1, 2], [3, 2**40]], np.int64)})
    with pytest.raises(DataError, match=r"in \[1, 1099511627776\].*torch.int32"):
        load_data(path, [spec], max_samples=100)


# -- Dataset --------------------------------------------------------------------------------------


def _rows(n: int) -> Dataset:
    """A dataset whose row i holds the value i in every column."""
    return Dataset({"x": torch.arange(n).repeat(3, 1).T.float(), "ids": torch.arange(n)},
                   synthetic=False, source="rows.npz")


@pytest.mark.parametrize(("n", "fraction", "held"), [(10, 0.2, 2), (2, 0.2, 1), (2, 0.9, 1),
                                                     (7, 0.5, 4), (100, 0.01, 1)])
def test_split_is_deterministic_disjoint_and_complete(n, fraction, held):
    data = _rows(n)
    train, holdout = data.split(fraction, seed=3)
    again_train, again_holdout = data.split(fraction, seed=3)
    assert torch.equal(train.inputs["ids"], again_train.inputs["ids"])
    assert torch.equal(holdout.inputs["ids"], again_holdout.inputs["ids"])
    assert len(holdout) == held and len(train) == n - held
    ids = torch.cat([train.inputs["ids"], holdout.inputs["ids"]])
    assert sorted(ids.tolist()) == list(range(n))
    assert torch.equal(train.inputs["x"][:, 0].long(), train.inputs["ids"])  # rows stay whole
    assert (train.source, train.synthetic) == ("rows.npz", False)


def test_split_shuffles_and_depends_on_the_seed():
    data = _rows(50)
    first = data.split(0.2, seed=0)[1].inputs["ids"].tolist()
    assert first != data.split(0.2, seed=1)[1].inputs["ids"].tolist()
    assert first != sorted(first) or first != list(range(40, 50))


@pytest.mark.parametrize(("n", "fraction", "match"), [(1, 0.2, "1 sample"),
                                                      (10, 0.0, "holdout_fraction"),
                                                      (10, 1.0, "holdout_fraction")])
def test_impossible_splits_are_refused(n, fraction, match):
    with pytest.raises(DataError, match=match):
        _rows(n).split(fraction, seed=0)


def test_batches_are_in_order_and_the_last_is_partial():
    data = _rows(10)
    batches = list(data.batches(4))
    assert [len(b["ids"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["ids"] for b in batches]), torch.arange(10))
    with pytest.raises(ValueError):
        next(data.batches(0))


def test_batches_and_rows_are_fresh_contiguous_tensors_not_views():
    # A program exported from a slice may carry guards about its input's base tensor.
    data = Dataset({"x": torch.randn(8, 6).t().contiguous().t()[:, :3].contiguous()},
                   synthetic=True, source="synthetic")
    for batch in [*data.batches(3), data.take(torch.arange(4))]:
        assert batch["x"]._base is None and batch["x"].is_contiguous()
        assert batch["x"].untyped_storage().data_ptr() != data.inputs["x"].untyped_storage(
        ).data_ptr()


def test_take_selects_rows_by_index():
    rows = _rows(6).take(torch.tensor([5, 0, 5]))
    assert rows["ids"].tolist() == [5, 0, 5]
    assert rows["x"][:, 2].tolist() == [5.0, 0.0, 5.0]


def test_dataset_refuses_mismatched_sample_counts():
    with pytest.raises(ValueError, match="one sample count"):
        Dataset({"a": torch.zeros(3), "b": torch.zeros(4)}, synthetic=True, source="synthetic")


# -- synthesize_data ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv", "text", "text_seq", "gate"])
def test_synthetic_data_feeds_the_program(programs, specs, kind):
    data = synthesize_data(specs[kind], samples=10, seed=0)
    assert (len(data), data.synthetic, data.source) == (10, True, "synthetic")
    for spec in specs[kind]:
        tensor = data.inputs[spec.name]
        assert tensor.dtype == spec.dtype
        assert tensor.shape == (10, *spec.example_shape[1:])
    for batch in data.batches(4):
        args, kwargs = call_arguments(programs[kind], batch)
        programs[kind].module()(*args, **kwargs)


@pytest.mark.parametrize("kind", ["mlp", "text", "gate"])
def test_synthetic_data_is_deterministic_under_the_seed(specs, kind):
    first = synthesize_data(specs[kind], samples=16, seed=7).inputs
    again = synthesize_data(specs[kind], samples=16, seed=7).inputs
    other = synthesize_data(specs[kind], samples=16, seed=8).inputs
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_synthetic_integers_respect_the_example_range(specs):
    data = synthesize_data(specs["text"], samples=500, seed=0).inputs
    ids, mask = specs["text"]
    assert ids.low <= data["input_ids"].min() and data["input_ids"].max() <= ids.high
    assert set(data["input_ids"].unique().tolist()) == set(range(int(ids.low), int(ids.high) + 1))
    assert set(data["attention_mask"].unique().tolist()) == {0, 1}


def test_constant_integer_inputs_stay_constant():
    specs = [InputSpec("mask", (None, 8), torch.int64, 1.0, 1.0),
             InputSpec("type_ids", (None, 8), torch.int32, 3.0, 3.0)]
    data = synthesize_data(specs, samples=20, seed=0).inputs
    assert torch.equal(data["mask"], torch.ones(20, 8, dtype=torch.int64))
    assert torch.equal(data["type_ids"], torch.full((20, 8), 3, dtype=torch.int32))


def test_synthetic_floats_follow_the_example_distribution():
    specs = [InputSpec("a", (None, 64), torch.float32, mean=2.0, std=0.5),
             InputSpec("flat", (None, 64), torch.float32, mean=-1.0, std=0.0),
             InputSpec("half", (None, 64), torch.float16, mean=0.0, std=1.0)]
    data = synthesize_data(specs, samples=256, seed=0).inputs
    assert data["a"].mean().item() == pytest.approx(2.0, abs=0.02)
    assert data["a"].std().item() == pytest.approx(0.5, rel=0.03)
    assert data["flat"].std().item() == pytest.approx(1e-3, rel=0.05)  # the std floor
    assert data["half"].dtype == torch.float16


def test_bools_follow_the_observed_rate(specs):
    keep = synthesize_data(specs["gate"], samples=2000, seed=0).inputs["keep"]
    assert keep.float().mean().item() == pytest.approx(9 / 15, abs=0.03)


def test_without_examples_floats_are_standard_normal_and_ints_binary():
    specs = [InputSpec("x", (None, 128), torch.float32, example_shape=None),
             InputSpec("ids", (None, None), torch.int64)]
    data = synthesize_data(specs, samples=128, seed=0).inputs
    assert data["x"].mean().item() == pytest.approx(0.0, abs=0.02)
    assert data["x"].std().item() == pytest.approx(1.0, rel=0.03)
    assert data["ids"].shape == (128, 1)
    assert set(data["ids"].unique().tolist()) == {0, 1}


def test_call_arguments_match_how_the_program_was_exported(programs):
    batch = {"x": torch.ones(2, 3), "keep": torch.tensor([[True, False, True]] * 2)}
    args, kwargs = call_arguments(programs["gate"], batch)
    assert len(args) == 2 and kwargs == {}
    assert torch.equal(programs["gate"].module()(*args, **kwargs), Gate()(**batch))
    args, kwargs = call_arguments(programs["mlp"], {"x": torch.ones(2, 32)})
    assert args == () and list(kwargs) == ["x"]
