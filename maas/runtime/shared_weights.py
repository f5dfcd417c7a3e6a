"""Weight sharing (Deep Compression's "trained quantization" storage): each weight matrix or
kernel is stored as ``2^bits`` shared values (``<path>.codebook``, float32) and, per weight,
the index of its value packed ``bits`` to a weight (``<path>.codes``, uint8); the float
tensor itself is not stored. ``dense_state`` gives the weights back at load time."""

from __future__ import annotations

import numpy as np
import torch

CODEBOOK, CODES = ".codebook", ".codes"


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """``indices`` (each below 2^bits) as a byte string of ``bits`` bits each."""
    as_bits = np.unpackbits(indices.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(as_bits.reshape(-1))


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    padded = np.concatenate([np.zeros((count, 8 - bits), np.uint8), as_bits], axis=1)
    return np.packbits(padded, axis=1).reshape(-1)


def shared_paths(state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors weight sharing stores: every float matrix or kernel."""
    return [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]


def dense_state(
    state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """The weights as the module holds them: each shared tensor rebuilt to ``shapes[key]``
    from its codebook and codes."""
    dense = {k: v for k, v in state.items() if not k.endswith((CODEBOOK, CODES))}
    for key in [k.removesuffix(CODEBOOK) for k in state if k.endswith(CODEBOOK)]:
        codebook = state[key + CODEBOOK]
        bits = int(np.log2(len(codebook)))
        count = int(np.prod(shapes[key]))
        indices = unpack(state[key + CODES].numpy(), bits, count)
        dense[key] = codebook[torch.from_numpy(indices.astype(np.int64))].reshape(shapes[key])
    return dense


def check_shared(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """Raise UnsupportedFormat unless every codebook has codes that fill its tensor."""
    from maas.errors import UnsupportedFormat

    for key in [k.removesuffix(CODEBOOK) for k in state if k.endswith(CODEBOOK)]:
        codebook, codes = state[key + CODEBOOK], state.get(key + CODES)
        size = len(codebook)
        if key not in shapes or codes is None or size < 2 or size & (size - 1) or size > 256:
            raise UnsupportedFormat(
                f"{key}: a codebook of 2 to 256 values (a power of 2) "
                "with its codes, for a tensor of the model"
            )
        bits = size.bit_length() - 1
        if codes.dtype != torch.uint8 or len(codes) * 8 < int(np.prod(shapes[key])) * bits:
            raise UnsupportedFormat(f"{key}{CODES} is too short for its tensor")
