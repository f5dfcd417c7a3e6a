"""How the engine runs a model: the options of a ``ModelRunner``, kept apart from it so that
the server, which only passes them on to the engine's process, is built without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunnerOptions:
    dtype: str = "float32"
    """float32, bfloat16, int8-weight, int8 (W8A8), or auto (see dtypes.py)."""
    kv_cache_dtype: str = "auto"
    """float32, bfloat16, or auto: the activations' dtype, or with ``dtype="auto"`` what
    ``auto`` chose (see dtypes.py)."""
    max_sequences: int = 32
    """Sequences that run at once; more wait."""
    max_model_len: int = 4096
    """Positions per sequence (prompt plus output); capped by the model's context and by
    what the KV cache holds."""
    kv_cache_bytes: int = 0
    """The most the KV cache may take. 0: what ``max_sequences`` sequences of
    ``max_model_len`` need (``kv_cache_budget``)."""
    block_size: int = 16
    """Positions per KV block."""
    compile: bool = True
    """Compile the decode step (see compiled.py); eager if compilation fails."""
    compile_always: bool = False
    """Keep the compiled steps wherever they compile and match eager, however they time (for
    tests of the compiled path on models too small to time apart)."""
    paged_attention: bool = True
    """Decode attention reads the KV cache in place with a C kernel built at first use
    (paged_attention.py); where it cannot be built, or false, blocks are gathered."""
    commit_kv_cache: bool = False
    """Touch every KV page at load (first writes then cost nothing) instead of as tokens fill
    them (the memory is then held only once used)."""
    draft: str = "off"
    """Speculative decoding's draft model (draft.py): the served model again in this dtype
    (bfloat16, int8-weight, int8), or off; auto: int8 where the model runs float32 whole (not
    a pipeline stage, weights not stored quantized), else off."""
    speculative_tokens: int = 8
    """Most tokens the draft proposes each round."""
    draft_min_confidence: float = 0.0
    """A proposal ends after a token the draft gives less than this probability."""
    threads: int = 0
    pack_weights: bool = True
