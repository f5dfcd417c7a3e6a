"""Hugging Face encoders: sequence classification, image classification, feature extraction.

Weights load from safetensors only and ``trust_remote_code`` is never set. An encrypted
version is built from its config and given a state dict decrypted in memory.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from maas.errors import UnsupportedFormat
from maas.registry.manifest import TensorSpec
from maas.registry.records import OpenedVersion
from maas.runtime.classic.torch_base import TorchRuntime

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Options of every ``from_pretrained`` of a model: nothing from the Hub and no code but
# transformers' own. ``use_kernels`` (on by default since transformers 5) would swap layers
# for kernels downloaded from the Hub and re-kernelise on every ``train()``, which fails
# outright on a pipeline stage whose other layers are on the meta device.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False, "use_kernels": False}


class TransformersRuntime(TorchRuntime):
    def load(self) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        auto = {
            "embeddings": transformers.AutoModel,
            "text-classification": transformers.AutoModelForSequenceClassification,
            "image-classification": transformers.AutoModelForImageClassification,
        }.get(self.opened.manifest.task)
        if auto is None:
            raise UnsupportedFormat(
                f"the transformers runtime cannot serve {self.opened.manifest.task!r}"
            )
        model = load_pretrained(self.opened, auto)
        self._use(model)
        self.inputs, self.outputs = signature_of(model, self.opened.manifest.task)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.outputs[0].name
        return {name: getattr(self._forward(inputs), name).float().numpy()}


def load_pretrained(opened: OpenedVersion, auto, dtype: torch.dtype | None = None):
    """The version's model as the ``transformers`` class ``auto`` builds it: safetensors only,
    never the model's own code. ``dtype`` None keeps the dtype config.json names."""
    options = {} if dtype is None else {"dtype": dtype}
    if opened.manifest.config.get(QUANTIZATION_KEY) is not None:
        return _int8_dynamic(opened, auto)
    if opened.data_keys:
        return _from_decrypted_state(opened, auto, options)
    return auto.from_pretrained(opened.folder, use_safetensors=True, **LOCAL_ONLY, **options)


def _from_decrypted_state(opened: OpenedVersion, auto, options: dict):
    """Build the model from its config, then load a state dict decrypted in memory."""
    from safetensors.torch import load
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        opened.folder, local_files_only=True, trust_remote_code=False
    )
    model = auto.from_config(config, **options)
    state: dict = {}
    for relpath in opened.data_keys:
        if relpath.endswith(".safetensors"):
            state.update(load(opened.read_bytes(relpath)))
    prefix = f"{model.base_model_prefix}."
    if not any(key.startswith(prefix) for key in model.state_dict()):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_to_loaded(model, state)
    missing = [key for key in missing if not key.endswith("position_ids") and key not in tied]
    if missing or unexpected:
        raise UnsupportedFormat(
            f"the weights do not fit {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    return model


QUANTIZATION_KEY = "maas_quantization"
"""config.json's key for how maas stores the weights: ``int8-dynamic`` or ``int8-dynamic-a8``
(its linear layers' weights int8 with ``<layer>.weight_scale``, see
maas/runtime/int8_linear.py)."""


def _int8_dynamic(opened: OpenedVersion, auto):
    """A model whose linear layers run dynamically quantized with the int8 weights stored."""
    from safetensors.torch import load
    from transformers import AutoConfig

    from maas.runtime.int8_linear import INT8_DYNAMIC, check_int8, dynamic_int8

    stored = opened.manifest.config[QUANTIZATION_KEY]
    if stored not in INT8_DYNAMIC:
        raise UnsupportedFormat(f"config.json {QUANTIZATION_KEY} {stored!r} is unknown")

    config = AutoConfig.from_pretrained(
        opened.folder, local_files_only=True, trust_remote_code=False
    )
    model = auto.from_config(config)
    state: dict = {}
    for entry in opened.manifest.files:
        if entry.path.endswith(".safetensors"):
            state.update(load(opened.read_bytes(entry.path)))
    check_int8(state)
    prefix = f"{model.base_model_prefix}."
    if not any(key.startswith(prefix) for key in model.state_dict()):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    try:
        return dynamic_int8(model, state, INT8_DYNAMIC[stored])
    except RuntimeError as err:  # load_state_dict's missing or unexpected keys
        raise UnsupportedFormat(
            f"the int8 weights do not fit {type(model).__name__}: {err}"
        ) from None


def _tied_to_loaded(model, state: dict) -> set[str]:
    """Parameters that share their tensor with one the checkpoint holds (GPT-2's lm_head is
    its token embedding), so the checkpoint need not hold them."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {parameters[name].data_ptr() for name in state if name in parameters}
    return {name for name, tensor in parameters.items() if tensor.data_ptr() in loaded}


def signature_of(model, task: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """v2 tensors of a loaded model: what its forward takes, and the output maas returns."""
    if task == "image-classification":
        size = model.config.image_size if hasattr(model.config, "image_size") else -1
        channels = getattr(model.config, "num_channels", 3)
        inputs = [
            TensorSpec(name="pixel_values", datatype="FP32", shape=[-1, channels, size, size])
        ]
        return inputs, [
            TensorSpec(name="logits", datatype="FP32", shape=[-1, model.config.num_labels])
        ]
    accepted = inspect.signature(model.forward).parameters
    inputs = [
        TensorSpec(name=name, datatype="INT64", shape=[-1, -1])
        for name in TEXT_INPUTS
        if name in accepted
    ]
    if task == "text-classification":
        return inputs, [
            TensorSpec(name="logits", datatype="FP32", shape=[-1, model.config.num_labels])
        ]
    hidden = model.config.hidden_size
    return inputs, [TensorSpec(name="last_hidden_state", datatype="FP32", shape=[-1, -1, hidden])]
