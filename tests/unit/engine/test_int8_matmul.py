"""The int8 kernel for steps of few rows: torch._int_mm's integers exactly (any shape, the
extreme codes, eager and compiled), the same tokens through the engine with and without it,
refusals of what it cannot take, and torch._int_mm wherever it cannot be built."""

from __future__ import annotations

import pytest
import torch

from maas.runtime.llm import int8_matmul, native
from maas.runtime.llm.kernels import Int8Linear
from tests.unit.engine.conftest import greedy, run_to_end, submit, token_ids


@pytest.fixture(autouse=True)
def _kernel_built():
    """Built (once, into the run's cache) when a test first needs it, not at collection."""
    if not int8_matmul.available():
        pytest.skip("no C compiler to build the kernel")


@pytest.fixture
def prompts(llama_tokenizer) -> list[list[int]]:
    return [llama_tokenizer.encode(t) for t in ("the quick brown fox", "one two three four")]


class Counted:
    """The built kernel, counting its calls."""

    def __init__(self, library) -> None:
        self.library, self.calls = library, 0

    def int8_row_matmul(self, *arguments):
        self.calls += 1
        return self.library.int8_row_matmul(*arguments)

    def int8_best_level(self) -> int:
        return self.library.int8_best_level()


@pytest.fixture
def counted(monkeypatch) -> Counted:
    counting = Counted(int8_matmul.NATIVE.load())
    monkeypatch.setattr(int8_matmul.NATIVE, "_library", counting)
    return counting


def codes(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])  # 9 and 17: torch._int_mm
@pytest.mark.parametrize(
    ("outputs", "inputs"),
    [(960, 576), (13, 1536), (7, 45), (4, 32), (1, 1), (3, 100)],  # whole and cut groups
)
def test_the_sums_are_torch_int_mms_integers(rows, outputs, inputs, counted):
    x, weight = codes(rows, inputs, seed=rows), codes(outputs, inputs, seed=inputs)
    sums = int8_matmul.row_sums(weight)
    expected = x.int() @ weight.int().t()
    assert torch.equal(int8_matmul.int8_matmul(x, weight, sums), expected)
    assert counted.calls == (1 if rows <= int8_matmul.rows_max() else 0)
    assert torch.equal(torch._int_mm(x, weight.t()), expected)  # what it stands in for
    best = int8_matmul.NATIVE.load().library.int8_best_level()
    for level in range(best + 1):  # every instruction set this CPU runs, not only its best
        if rows <= int8_matmul.rows_max():
            assert torch.equal(int8_matmul._run(x, weight, sums, level), expected), level


@pytest.fixture
def rows_asked_again():
    """rows_max asked afresh in the test, and again after it (it keeps its answer)."""
    int8_matmul.rows_max.cache_clear()
    yield
    int8_matmul.rows_max.cache_clear()


def test_the_rows_it_takes_follow_the_cpus_instruction_set(monkeypatch, rows_asked_again):
    library = int8_matmul.NATIVE.load()
    for level, rows in [(3, int8_matmul.ROWS_MAX), (2, 2), (1, 2), (0, 2)]:
        monkeypatch.setattr(library, "int8_best_level", lambda level=level: level)
        int8_matmul.rows_max.cache_clear()
        assert int8_matmul.rows_max() == rows
    monkeypatch.setattr(int8_matmul.NATIVE, "_library", None)
    monkeypatch.setattr(int8_matmul.NATIVE, "_failed", True)
    int8_matmul.rows_max.cache_clear()
    assert int8_matmul.rows_max() == 0


def test_a_level_the_cpu_does_not_run_is_refused():
    best = int8_matmul.NATIVE.load().int8_best_level()
    if best == 3:
        pytest.skip("this CPU runs every level")
    weight = codes(4, 8, seed=0)
    with pytest.raises(ValueError, match=f"does not run the int8 kernel's level {best + 1}"):
        int8_matmul._run(codes(1, 8, seed=0), weight, int8_matmul.row_sums(weight), best + 1)


def test_rows_too_long_for_exact_int32_sums_go_to_torch_int_mm(counted):
    x = codes(1, int8_matmul.LONGEST + 32, seed=1)
    weight = codes(2, int8_matmul.LONGEST + 32, seed=2)
    sums = int8_matmul.row_sums(weight)
    assert torch.equal(int8_matmul.int8_matmul(x, weight, sums), torch._int_mm(x, weight.t()))
    assert counted.calls == 0


@pytest.mark.parametrize(("x_code", "weight_code"), [(-128, -128), (127, -128), (-128, 127)])
def test_the_largest_codes_do_not_overflow(x_code, weight_code):
    inputs = int8_matmul.LONGEST  # the most the kernel takes: sums of up to 2^30
    x = torch.full((2, inputs), x_code, dtype=torch.int8)
    weight = torch.full((8, inputs), weight_code, dtype=torch.int8)
    sums = int8_matmul.row_sums(weight)
    expected = torch.full((2, 8), inputs * x_code * weight_code)
    best = int8_matmul.NATIVE.load().int8_best_level()
    for level in range(best + 1):
        assert torch.equal(int8_matmul._run(x, weight, sums, level), expected), level


def test_a_compiled_step_calls_it_as_an_operator():
    x, weight = codes(1, 576, seed=1), codes(960, 576, seed=2)
    compiled = torch.compile(lambda x, w, s: int8_matmul.int8_matmul(x, w, s) * 2, fullgraph=True)
    sums = int8_matmul.row_sums(weight)
    with torch.profiler.profile() as profile:
        got = compiled(x, weight, sums)
    assert torch.equal(got, (x.int() @ weight.int().t()) * 2)
    assert "maas::int8_matmul" in {event.name for event in profile.events()}


@pytest.mark.parametrize(
    ("x", "weight", "error"),
    [
        (torch.zeros(1, 8), codes(4, 8, seed=0), "int8 rows and weights"),
        (codes(1, 8, seed=0), codes(4, 9, seed=0), "do not match"),
        (codes(8, seed=0), codes(4, 8, seed=0), "do not match"),
    ],
)
def test_what_it_cannot_take_is_refused(x, weight, error):
    with pytest.raises(ValueError, match=error):
        int8_matmul.int8_matmul(x, weight, torch.zeros(weight.shape[0], dtype=torch.int32))


@pytest.mark.parametrize("sums", [torch.zeros(4), torch.zeros(5, dtype=torch.int32)])
def test_row_sums_of_another_kind_or_length_are_refused(sums):
    with pytest.raises(ValueError, match=r"row sums are int32 \[4\]"):
        int8_matmul.int8_matmul(codes(1, 8, seed=0), codes(4, 8, seed=0), sums)


def test_a_layer_gives_the_same_result_with_and_without_it(counted):
    linear = torch.nn.Linear(576, 960)
    layer = Int8Linear(linear)
    assert layer.few_rows_kernel
    x = torch.randn(2, 576)
    with_kernel = layer(x)
    assert counted.calls == 1
    layer.few_rows_kernel = False
    assert torch.equal(layer(x), with_kernel)
    assert counted.calls == 1


@pytest.mark.parametrize("compile", [False, True])
def test_the_engine_gives_the_same_tokens_with_and_without_it(
    make_engine, monkeypatch, prompts, compile
):
    def tokens():
        engine = make_engine(dtype="int8", compile=compile)
        deltas = [submit(engine, f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)]
        run_to_end(engine)
        alone = submit(engine, "alone", prompts[0], greedy(12))
        run_to_end(engine)
        return [token_ids(d) for d in deltas] + [token_ids(alone)]

    counting = Counted(int8_matmul.NATIVE.load())
    monkeypatch.setattr(int8_matmul.NATIVE, "_library", counting)
    with_kernel = tokens()
    assert counting.calls > 0  # one-row steps went through it
    monkeypatch.setattr(int8_matmul.NATIVE, "_library", None)
    monkeypatch.setattr(int8_matmul.NATIVE, "_failed", True)  # as if it could not be built
    assert not Int8Linear(torch.nn.Linear(8, 8)).few_rows_kernel
    assert tokens() == with_kernel


def test_without_a_compiler_torch_int_mm_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(int8_matmul.NATIVE, "_library", None)
    monkeypatch.setattr(int8_matmul.NATIVE, "_failed", False)
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not int8_matmul.available()
    assert not (tmp_path / "kernels").exists()
    layer = Int8Linear(torch.nn.Linear(64, 32))
    assert not layer.few_rows_kernel
    x = torch.randn(1, 64)
    assert layer(x).shape == (1, 32)
