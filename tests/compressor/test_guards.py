"""Program guards: storage guards from sliced example inputs are dropped, the rest explained."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.export import Dim

import compressor
from compressor.errors import GuardError
from compressor.load.guards import guard_failure
from compressor.load.program import load_program
from tests.support.corpus_programs import CASES, MLP, TinyLlama, save

FAST = {"ratio": 0.5, "finetune": {"steps": 1}, "export": {"latency_seconds": 0}}


@pytest.fixture(scope="module")
def sliced_program(tmp_path_factory):
    case = next(c for c in CASES if "issue 13" in c.name)
    return save(case, tmp_path_factory.mktemp("guards") / "sliced.pt2")


def test_the_guard_about_a_sliced_example_input_is_dropped_at_load(sliced_program):
    fresh = torch.randint(0, 96, (3, 40))
    raw = torch.export.load(str(sliced_program))
    assert any("._base" in guard for guard in raw._guards_code)
    with pytest.raises(AttributeError):  # what torch does with it: no fresh tensor has a _base
        raw.module()(fresh)
    program = load_program(sliced_program)
    assert not any("._base" in guard for guard in program._guards_code)
    assert program.module()(fresh).shape == (3, 40, 96)


def test_the_other_guards_are_kept(tmp_path):
    program = torch.export.export(TinyLlama().eval(), (torch.randint(0, 96, (2, 16)),),
                                  dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=32)},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = load_program(tmp_path / "m.pt2")
    with pytest.raises(AssertionError, match="Guard failed"):
        loaded.module()(torch.randint(0, 96, (2, 40)))


@pytest.mark.parametrize("guard,says", [
    ("input_ids.size()[1] <= 128", ("input 'input_ids'", "`input_ids.size()[1] <= 128`",
                                    "Dim.DYNAMIC", "fresh, contiguous")),
    ("x.size()[0] <= 8", ("input 'x'", "batches of 1 to 64", "Dim('batch')")),
    ("2 <= mask.size()[1]", ("input 'mask'", "`2 <= mask.size()[1]`")),
])
def test_a_failed_guard_becomes_a_one_sentence_error_naming_input_and_guard(guard, says):
    error = guard_failure(AssertionError(f"Guard failed: {guard}\n\nWhile executing ..."))
    assert isinstance(error, GuardError) and error.code == "guard_failed"
    for fragment in says:
        assert fragment in error.message
    assert "\n" not in error.message and "While executing" not in error.message


def test_other_exceptions_are_not_guard_failures():
    assert guard_failure(AssertionError("shapes differ")) is None
    assert guard_failure(RuntimeError("Guard failed: x.size()[0] <= 8")) is None


def test_a_data_file_whose_shapes_break_a_guard_is_refused_at_load(tmp_path):
    model = MLP().eval()
    program = torch.export.export(model, (torch.randn(4, 32),),
                                  dynamic_shapes=({0: Dim("batch", max=16)},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    save_file({"x": torch.randn(100, 32)}, str(tmp_path / "data.safetensors"))
    with pytest.raises(GuardError) as caught:
        compressor.compress(tmp_path / "m.pt2", FAST, out_dir=tmp_path / "out",
                            data=tmp_path / "data.safetensors")
    assert "input 'x' does not meet the guard `x.size()[0] <= 16`" in caught.value.message
    assert "checked on a batch of 64 sample(s)" in caught.value.message
    assert "stage loading: started" in (tmp_path / "out" / "job.log").read_text()
