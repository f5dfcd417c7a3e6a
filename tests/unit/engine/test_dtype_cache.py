"""``auto``'s choice is measured once per model, machine and code and kept for later loads;
anything else that could change it measures again, and a broken cache never stops a load."""

from __future__ import annotations

import json

import pytest
import torch

import maas.runtime.llm.runner as runner_module
from maas.config import Settings
from maas.registry import open_registry
from maas.runtime.llm import dtype_cache, paged_attention
from maas.runtime.llm.dtypes import QUALITY_ORDER
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from tests.fixtures import make_tiny_llama


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A cache of this test's own, and the number of times ``choose`` measured."""
    paged_attention.available(torch.float32)  # built (once a run) into the run's own cache
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = runner_module.choose

    def counting(*args, **kwargs):
        calls.append(kwargs["batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "choose", counting)
    return calls


def auto(version, tokenizer, max_sequences=4):
    options = RunnerOptions(dtype="auto", max_sequences=max_sequences, compile=False)
    return ModelRunner(version, options, tokenizer)


def test_a_second_load_takes_the_kept_choice_with_its_trials(
    measured, llama_version, llama_tokenizer, tmp_path
):
    first = auto(llama_version, llama_tokenizer)
    second = auto(llama_version, llama_tokenizer)
    assert measured == [4]
    assert second.dtype == first.dtype in QUALITY_ORDER
    assert second.dtype_choice == first.dtype_choice
    assert [t.dtype for t in second.dtype_choice.trials] == list(QUALITY_ORDER)
    assert second.cache.dtype == first.cache.dtype == first.dtype_choice.kv_cache_dtype
    [kept] = (tmp_path / "cache" / "dtypes").iterdir()
    kept = json.loads(kept.read_text())
    assert (kept["dtype"], kept["kv_cache"]) == (first.dtype, first.dtype_choice.kv_cache)


def test_the_same_weights_imported_again_share_the_choice(measured, tmp_path):
    source = make_tiny_llama(tmp_path / "llama")
    runners = []
    for home in ("one", "two"):  # another import: another manifest id and date
        registry = open_registry(Settings(home=tmp_path / home))
        registry.import_model(source, "tiny")
        runners.append(auto(registry.open_version("tiny"), None))
        registry.close()
    assert len(measured) == 1
    assert runners[0].dtype_choice == runners[1].dtype_choice


def test_other_timing_options_measure_again(measured, llama_version, llama_tokenizer):
    auto(llama_version, llama_tokenizer, max_sequences=4)
    auto(llama_version, llama_tokenizer, max_sequences=2)  # another batch is timed
    auto(llama_version, llama_tokenizer, max_sequences=2)
    assert measured == [4, 2]


def test_the_name_changes_with_the_model_and_the_options_and_only_then():
    name = dtype_cache.key("a" * 64, batch=4, paged=True)
    assert len(name) == 32 and dtype_cache.key("a" * 64, batch=4, paged=True) == name
    assert dtype_cache.key("a" * 64, paged=True, batch=4) == name
    assert dtype_cache.key("b" * 64, batch=4, paged=True) != name
    assert dtype_cache.key("a" * 64, batch=4, paged=False) != name


def test_a_damaged_or_foreign_kept_choice_is_measured_again(
    measured, llama_version, llama_tokenizer, tmp_path
):
    auto(llama_version, llama_tokenizer)
    [kept] = (tmp_path / "cache" / "dtypes").iterdir()
    kept.write_text("{not json")
    assert auto(llama_version, llama_tokenizer).dtype in QUALITY_ORDER
    assert len(measured) == 2 and json.loads(kept.read_text())["trials"]  # written again
    choice = json.loads(kept.read_text())
    kept.write_text(json.dumps({**choice, "dtype": "int3"}))  # not one of the candidates
    assert auto(llama_version, llama_tokenizer).dtype in QUALITY_ORDER
    assert len(measured) == 3


def test_a_cache_that_cannot_be_written_still_loads(
    measured, llama_version, llama_tokenizer, tmp_path, monkeypatch
):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("MAAS_CACHE_DIR", str(blocked))  # a folder cannot be made under it
    for _ in range(2):
        assert auto(llama_version, llama_tokenizer).dtype in QUALITY_ORDER
    assert len(measured) == 2


def test_no_cache_folder_at_all_still_loads(measured, llama_version, llama_tokenizer, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")  # Path.home() without HOME

    monkeypatch.setattr(dtype_cache, "cache_root", no_home)
    assert auto(llama_version, llama_tokenizer).dtype in QUALITY_ORDER
    assert len(measured) == 1


def test_a_failed_write_leaves_nothing_behind(measured, llama_version, llama_tokenizer, tmp_path):
    auto(llama_version, llama_tokenizer)
    [kept] = (tmp_path / "cache" / "dtypes").iterdir()
    kept.unlink()
    kept.mkdir()  # the choice can be neither read nor replaced there
    assert auto(llama_version, llama_tokenizer).dtype in QUALITY_ORDER
    assert len(measured) == 2
    assert list((tmp_path / "cache" / "dtypes").iterdir()) == [kept]  # no temporary file left
