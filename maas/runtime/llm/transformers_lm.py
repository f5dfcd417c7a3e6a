"""A causal LM that ``transformers`` runs, for the architectures maas's engine does not.

It offers the generator what it needs and nothing more: the logits after a prompt, then after
one more token per row, with the keys and values kept in ``transformers``' own cache
(``past_key_values``). Weights load from safetensors only (decrypted in memory when encrypted
at rest) and the model's own code is never run.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch
from torch import Tensor

from maas.registry.records import OpenedVersion
from maas.runtime.classic.transformers_task import load_pretrained
from maas.runtime.llm.dtypes import ACTIVATIONS
from maas.runtime.llm.runner import RunnerOptions

log = logging.getLogger(__name__)


class TransformersLM:
    def __init__(self, opened: OpenedVersion, options: RunnerOptions) -> None:
        import transformers

        started = time.perf_counter()
        transformers.utils.logging.disable_progress_bar()
        if options.threads:
            torch.set_num_threads(options.threads)
        # int8 choices quantise maas's own Llama layers; here they, and auto, run in float32
        dtype = ACTIVATIONS.get(options.dtype, torch.float32)
        self.model = load_pretrained(opened, transformers.AutoModelForCausalLM, dtype).eval()
        self.dtype_name = str(dtype).removeprefix("torch.")
        context = opened.manifest.context_length
        self.max_len = min(options.max_model_len, context) if context else options.max_model_len
        """Prompt plus output tokens of a sequence, at most."""
        self.memory_bytes = _parameter_bytes(self.model) + self._cache_bytes(dtype)
        accepted = inspect.signature(self.model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        """Most models can skip the logits of all but the last position: a long prompt would
        otherwise make a [positions, vocab] tensor."""
        log.info(
            "%s ready in %.1fs on transformers (%s), %s, up to %d positions",
            opened.record.reference,
            time.perf_counter() - started,
            type(self.model).__name__,
            options.dtype,
            self.max_len,
        )

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], rows: int) -> tuple[Tensor, object]:
        """Float32 logits [rows, vocab] of the token after the prompt, and the cache holding
        the prompt once per row (the prompt runs once)."""
        output = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, **self._last_only)
        cache = output.past_key_values
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return output.logits[:, -1].float().expand(rows, -1), cache

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache) -> Tensor:
        """Float32 logits [rows, vocab] after one more token per row; the cache grows."""
        output = self.model(
            input_ids=torch.tensor(tokens)[:, None], past_key_values=cache, use_cache=True
        )
        return output.logits[:, -1].float()

    @torch.inference_mode()
    def keep_rows(self, cache, rows: list[int]) -> None:
        """Drop the other rows from the cache (sequences that have finished)."""
        cache.batch_select_indices(torch.tensor(rows))

    def _cache_bytes(self, dtype: torch.dtype) -> int:
        """Keys and values of one sequence of ``max_len`` tokens (an estimate: it assumes
        every head keeps its own keys and values)."""
        config = self.model.config
        layers = getattr(config, "num_hidden_layers", 0) or 0
        hidden = getattr(config, "hidden_size", 0) or 0
        return 2 * layers * hidden * self.max_len * dtype.itemsize


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
