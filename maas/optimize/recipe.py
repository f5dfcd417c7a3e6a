"""Recipes: steps in order, written ``prune 0.5 -> quantize int8-dynamic`` or as a JSON list
(``[{"step": "prune", "amount": 0.5}, {"step": "quantize", "method": "int8-dynamic"}]``).

Each step names what it does and takes its options; ``check`` refuses, before any job starts
and with a message naming the step, a recipe whose steps are out of order, repeated, out of
range, or do not fit the model (its runtime and task), and steps this maas does not do yet.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from maas.errors import InvalidRequest
from maas.registry.manifest import Manifest

KINDS = ("prune", "distil", "share", "quantize", "export")
"""The step kinds, in the order a recipe must keep: a model is made smaller (pruned,
distilled), then its weights stored more cheaply (shared or quantized), then exported."""
QUANTIZE_METHODS = ("int8-dynamic", "int8-static", "int8", "int4", "bfloat16")
LLM_METHODS = ("int8", "int4", "bfloat16")
"""Weight-only methods that store an LLM's weights (maas/optimize/llm_quantize.py)."""
GROUP_SIZES = (32, 64, 128, 256)
"""int4's weights per scale and zero: maas.runtime.llm.quantized.GROUP_SIZES, written again
so that checking a recipe imports no torch (a test keeps the two equal)."""
PRUNE_KINDS = ("unstructured", "structured")
GGUF_TYPES = ("q8_0", "q4_0", "q4_1")
POSITIONAL = ("amount", "structure", "method", "bits", "format", "type")
"""Options written bare in a recipe string (``prune 0.5 structured``); the others are
written ``name=value`` (``distil width=0.5 steps=300``)."""
DEFAULTS = {"structure": "unstructured", "fine_tune_steps": 0, "group_size": 32}
"""Options filled in when a recipe is read, and left out when a step is shown."""
LEARNING = {
    "classic": {"steps": 300, "learning_rate": 1e-3, "temperature": 4.0, "alpha": 0.7},
    "llm": {"steps": 100, "learning_rate": 1e-4, "temperature": 1.0, "alpha": 1.0},
}
"""A learning step's options left unset, by the model it runs on (``Step.setting``): a whole
LLM fine-tuned takes a smaller rate than a small classifier, and an LLM learns from the
teacher's logits alone at temperature 1 (Minitron's finding); a classifier from softened
targets and its labels (Hinton et al.)."""
BUILT = {
    ("prune", "unstructured"),
    ("prune", "structured"),
    ("quantize", "int8-dynamic"),
    ("share", ""),
    ("distil", ""),
    ("quantize", "int8-static"),
    ("export", "onnx"),
    ("export", "gguf"),
    ("quantize", "int8"),
    ("quantize", "int4"),
    ("quantize", "bfloat16"),
}
"""The steps this maas runs today; the others are refused as not built yet."""


@dataclass(frozen=True)
class Step:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """What distinguishes steps of one kind (a quantization method, a pruning kind, an
        export format)."""
        options = self.options
        return str(options.get("method") or options.get("structure") or options.get("format") or "")

    @property
    def needs_data(self) -> bool:
        """Whether the step learns from the job's ``training_file``."""
        return (
            self.kind == "distil"
            or bool(self.options.get("fine_tune_steps"))
            or self.options.get("method") == "int8-static"  # calibration
        )

    def setting(self, name: str, family: str = "classic") -> Any:
        """An option as given, or its default for the ``family`` of model ("classic" or
        "llm")."""
        return self.options.get(name, LEARNING[family].get(name))

    def __str__(self) -> str:
        shown = [
            str(v) if k in POSITIONAL else f"{k}={v}"
            for k, v in self.options.items()
            if (k, v) not in DEFAULTS.items()
        ]
        return " ".join([self.kind, *shown])


def parse(recipe: str | list) -> list[Step]:
    """The steps of a recipe string or JSON list, each with its options checked for range."""
    raw = _split(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("a recipe has at least one step", param="recipe")
    return [_step(item, index) for index, item in enumerate(raw)]


def check(steps: list[Step], manifest: Manifest) -> None:
    """Refuse steps out of order or repeated, or that do not fit the model."""
    seen: list[str] = []
    for index, step in enumerate(steps):
        where = f"step {index + 1} ({step})"
        if step.kind in seen:
            raise InvalidRequest(f"{where}: a recipe has one {step.kind} step", param="recipe")
        if seen and KINDS.index(step.kind) < KINDS.index(seen[-1]):
            raise InvalidRequest(
                f"{where} comes after {seen[-1]}: steps run in the order " + ", ".join(KINDS),
                param="recipe",
            )
        if step.kind == "quantize" and "share" in seen:
            raise InvalidRequest(
                f"{where}: shared weights are already a codebook; quantize or share, not both",
                param="recipe",
            )
        if manifest.runtime == "llm":
            _llm_order(step, where, steps, seen, manifest)
        elif step.kind == "distil":
            _student_fits(step, where, manifest)
        if step.kind == "distil" and _same_student(step) and _alone(step, seen):
            raise InvalidRequest(
                f"{where}: a student as wide as its teacher learns nothing new: set width "
                "below 1, prune first, or name a larger teacher",
                param="recipe",
            )
        _fits(step, where, manifest)
        _exports(step, where, steps, manifest)
        seen.append(step.kind)


NOT_EXPORTABLE = {
    "lstm-classifier": "its packed variable-length sequences do not trace into ONNX "
    "(torch.export cannot follow pack_padded_sequence)",
}


def _exports(step: Step, where: str, steps: list[Step], manifest: Manifest) -> None:
    """Static int8 runs in ONNX Runtime; an export takes float or int8 weights, not shared
    ones; and some architectures do not export."""
    exported = any(s.kind == "export" and s.variant == "onnx" for s in steps)
    if step.variant == "int8-static" and not exported:
        raise InvalidRequest(
            f"{where}: static int8 runs in ONNX Runtime: end the recipe with export onnx",
            param="recipe",
        )
    if step.kind != "export" or step.variant != "onnx":
        return
    if any(s.kind == "share" for s in steps):
        raise InvalidRequest(
            f"{where}: shared weights are how maas stores torch weights; an ONNX graph holds "
            "them dense, so export without share (or quantize int8-dynamic) instead",
            param="recipe",
        )
    architecture = manifest.config.get("architecture")
    if architecture in NOT_EXPORTABLE:
        raise InvalidRequest(
            f"{where}: {architecture} does not export to ONNX: {NOT_EXPORTABLE[architecture]}",
            param="recipe",
        )
    if importlib.util.find_spec("onnxscript") is None:
        raise InvalidRequest(
            f"{where}: torch's ONNX exporter needs onnxscript, which this server lacks "
            "(pip install 'maas[optimize]')",
            param="recipe",
        )


def layer_count(architecture: str, arguments: dict[str, Any]) -> int:
    """What a distil step's ``layers`` counts in ``architecture``: conv blocks, or layers."""
    if architecture == "small-cnn":
        return len(arguments.get("channels", [16, 32]))
    return int(arguments.get("num_layers", 2 if architecture == "transformer-classifier" else 1))


def _student_fits(step: Step, where: str, manifest: Manifest) -> None:
    architecture = manifest.config.get("architecture")
    layers = step.options.get("layers")
    if architecture is None or layers is None:
        return
    most = layer_count(architecture, manifest.config.get("arguments", {}))
    if layers > most:
        raise InvalidRequest(
            f"{where}: the teacher has {most} layer(s); a student has at most as many",
            param="recipe",
        )


def _llm_order(step: Step, where: str, steps: list[Step], seen: list[str], manifest) -> None:
    """An LLM's export gguf re-encodes its parent alone; a distilled student is shallower
    than its teacher or pruned before, and takes the teacher's width and tokenizer."""
    if len(steps) > 1 and any(s.variant == "gguf" for s in steps):
        raise InvalidRequest(
            f"{where}: export gguf re-encodes the parent GGUF's weights as a recipe of its own; "
            "quantize stores the weights of a pruned or distilled LLM for maas's engine",
            param="recipe",
        )
    if step.kind != "distil":
        return
    for option in ("width", "teacher"):
        if option in step.options:
            raise InvalidRequest(
                f"{where}: an LLM's student takes its teacher's width and tokenizer, and its "
                f"teacher is the parent: {option} is a classic model's option (give layers)",
                param="recipe",
            )
    layers = step.options.get("layers")
    most = llm_layers(manifest)
    if layers is None and "prune" not in seen:
        raise InvalidRequest(
            f"{where}: a student as deep as its teacher learns nothing new: give layers "
            f"(below {most}), or prune structured first",
            param="recipe",
        )
    if layers is not None and most is not None and layers >= most and "prune" not in seen:
        raise InvalidRequest(
            f"{where}: the teacher has {most} layers; a student has fewer", param="recipe"
        )
    if layers is not None and most is not None and layers > most:
        raise InvalidRequest(
            f"{where}: the teacher has {most} layers; a student has at most as many",
            param="recipe",
        )


def llm_layers(manifest: Manifest) -> int | None:
    """An LLM's decoder layers, from its config.json or GGUF header."""
    config = manifest.config
    if "num_hidden_layers" in config:
        return int(config["num_hidden_layers"])
    architecture = config.get("general.architecture")
    count = config.get(f"{architecture}.block_count")
    return int(count) if count is not None else None


def _same_student(step: Step) -> bool:
    """A distil step whose student is as wide and as deep as the candidate."""
    return step.options.get("width") == 1 and step.options.get("layers") is None


def _alone(step: Step, seen: list[str]) -> bool:
    """A distil step whose student would be its teacher: nothing pruned it, none named."""
    return "prune" not in seen and not step.options.get("teacher")


def _fits(step: Step, where: str, manifest: Manifest) -> None:
    torch_builtin = manifest.runtime == "torch" and "architecture" in manifest.config
    stored = manifest.config.get("quantization") or manifest.config.get("maas_quantization")
    if stored:
        raise InvalidRequest(
            f"{where}: the version is {stored} already; optimize its float parent",
            param="recipe",
        )
    if (step.kind, step.variant) not in BUILT:
        raise InvalidRequest(
            f"{where}: this maas does not run that step yet (it runs: "
            + ", ".join(f"{k} {v}".strip() for k, v in sorted(BUILT))
            + ")",
            param="recipe",
        )
    if step.kind == "share" and importlib.util.find_spec("sklearn") is None:
        raise InvalidRequest(
            f"{where}: weight sharing clusters with scikit-learn, which this server lacks "
            "(pip install 'maas[training]')",
            param="recipe",
        )
    if manifest.runtime == "llm" or step.variant == "gguf":
        _fits_llm(step, where, manifest)
        return
    if manifest.runtime == "transformers":
        _fits_encoder(step, where, manifest)
        return
    if step.kind == "quantize" and step.variant in LLM_METHODS:
        raise InvalidRequest(
            f"{where}: quantize {step.variant} stores an LLM's weights for maas's engine; "
            "for this model quantize int8-dynamic (or int8-static with export onnx)",
            param="recipe",
        )
    if not torch_builtin:
        raise InvalidRequest(
            f"{where} does not fit a {manifest.format} model of the {manifest.runtime} runtime: "
            "it transforms maas's built-in torch architectures",
            param="recipe",
        )


ENCODER_TASKS = ("embeddings", "text-classification")
ENCODER_STEPS = {("quantize", "int8-dynamic"), ("quantize", "int8-static"), ("export", "onnx")}


def _fits_encoder(step: Step, where: str, manifest: Manifest) -> None:
    """A Hugging Face encoder (embeddings, text classification) quantizes to dynamic int8 in
    torch, or exports to ONNX (quantized there, dynamic or static)."""
    if manifest.task not in ENCODER_TASKS or manifest.format != "huggingface":
        raise InvalidRequest(
            f"{where}: of the transformers runtime's models, this maas optimizes encoders "
            f"({', '.join(ENCODER_TASKS)}); this one serves {manifest.task}",
            param="recipe",
        )
    if (step.kind, step.variant) not in ENCODER_STEPS:
        raise InvalidRequest(
            f"{where}: for a Hugging Face encoder this maas runs quantize int8-dynamic, "
            "export onnx, and either quantize before export onnx (int8-static calibrates on "
            "a training file's texts)",
            param="recipe",
        )


LLM_STEPS = (
    "prune AMOUNT structured, distil layers=N, quantize "
    + " | ".join(LLM_METHODS)
    + f", or export gguf ({', '.join(GGUF_TYPES)}) alone"
)


def _fits_llm(step: Step, where: str, manifest: Manifest) -> None:
    """An LLM of maas's engine is pruned (structured), distilled into fewer layers, stores
    its weights as int8, int4 or bfloat16, or exports to GGUF; the other steps are the classic
    models'."""
    llm = manifest.runtime == "llm"
    if llm and (step.kind, step.variant) in (("prune", "structured"), ("distil", "")):
        return
    if step.kind == "quantize" and step.variant in LLM_METHODS and llm:
        return
    if step.variant != "gguf":
        hint = (
            "sparse weights do not speed up the engine's dense matrix products; prune "
            "structured removes whole neurons and heads"
            if step.variant == "unstructured"
            else f"{f'{step.kind} {step.variant}'.strip()} transforms maas's built-in torch "
            "architectures"
        )
        raise InvalidRequest(
            f"{where}: for an LLM this maas runs {LLM_STEPS}; {hint}", param="recipe"
        )
    if manifest.runtime != "llm" or manifest.format != "gguf":
        raise InvalidRequest(
            f"{where}: export gguf re-encodes a GGUF LLM of maas's engine; this is a "
            f"{manifest.format} model of the {manifest.runtime} runtime",
            param="recipe",
        )


def _split(text: str) -> list[dict[str, Any]]:
    """``prune 0.5 structured -> quantize int8-dynamic`` as step dicts."""
    steps = []
    for part in text.split("->"):
        words = part.split()
        if not words:
            raise InvalidRequest(f"the recipe {text!r} has an empty step", param="recipe")
        kind, args = words[0].lower(), words[1:]
        if kind not in KINDS:
            raise InvalidRequest(
                f"unknown step {kind!r}; steps are " + ", ".join(KINDS), param="recipe"
            )
        named = dict(_named(arg) for arg in args if "=" in arg)
        bare = [arg for arg in args if "=" not in arg]
        steps.append({"step": kind, **_positional(kind, bare), **named})
    return steps


def _named(arg: str) -> tuple[str, Any]:
    """``steps=300`` as ("steps", 300): a number where it reads as one, else the text."""
    name, _, text = arg.partition("=")
    if not name or not text:
        raise InvalidRequest(f"cannot read the option {arg!r}; write name=value", param="recipe")
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


def _positional(kind: str, args: list[str]) -> dict[str, Any]:
    if kind == "prune":
        options: dict[str, Any] = {}
        for arg in args:
            if arg in PRUNE_KINDS:
                options["structure"] = arg
            else:
                options["amount"] = _number(arg, "prune amount")
        return options
    if kind == "quantize" and len(args) == 1:
        return {"method": args[0]}
    if kind == "share" and len(args) == 1:
        return {"bits": int(_number(args[0], "share bits"))}
    if kind == "export" and len(args) in (1, 2):
        return {"format": args[0], **({"type": args[1].lower()} if len(args) == 2 else {})}
    if args:
        raise InvalidRequest(f"cannot read the step {' '.join([kind, *args])!r}", param="recipe")
    return {}


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequest(f"{what} {text!r} is not a number", param="recipe") from None


def _step(item: Any, index: int) -> Step:
    where = f"step {index + 1}"
    if not isinstance(item, dict) or not isinstance(item.get("step"), str):
        raise InvalidRequest(f"{where} should be an object with a 'step'", param="recipe")
    kind = item["step"]
    options = {k: v for k, v in item.items() if k != "step"}
    if kind not in KINDS:
        raise InvalidRequest(
            f"{where}: unknown step {kind!r}; steps are " + ", ".join(KINDS), param="recipe"
        )
    return Step(kind, _checked(kind, options, where))


def _checked(kind: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    def refuse(message: str) -> None:
        raise InvalidRequest(f"{where} ({kind}): {message}", param="recipe")

    allowed = {
        "prune": {"amount", "structure", "fine_tune_steps", "learning_rate"},
        "distil": {"width", "layers", "steps", "temperature", "alpha", "learning_rate", "teacher"},
        "share": {"bits"},
        "quantize": {"method", "group_size"},
        "export": {"format", "type"},
    }[kind]
    unknown = set(options) - allowed
    if unknown:
        refuse(f"unknown option {sorted(unknown)[0]!r}; it takes " + ", ".join(sorted(allowed)))
    if kind == "prune":
        amount = options.get("amount")
        if not isinstance(amount, int | float) or not 0 < amount < 1:
            refuse("amount is the fraction of weights to remove, above 0 and below 1")
        options.setdefault("structure", "unstructured")
        if options["structure"] not in PRUNE_KINDS:
            refuse("structure is " + " or ".join(PRUNE_KINDS))
        options.setdefault("fine_tune_steps", 0)
        if not _whole(options["fine_tune_steps"], 0, MAX_STEPS):
            refuse(f"fine_tune_steps is a whole number from 0 to {MAX_STEPS:,}")
    if "learning_rate" in options:
        rate = options["learning_rate"]
        if not isinstance(rate, int | float) or not 0 < rate <= 1:
            refuse("learning_rate is above 0 and at most 1")
    if kind == "distil":
        _distil_options(options, refuse)
    if kind == "quantize" and options.get("method") not in QUANTIZE_METHODS:
        refuse("method is one of " + ", ".join(QUANTIZE_METHODS))
    if kind == "quantize" and options["method"] == "int4":
        if options.setdefault("group_size", 32) not in GROUP_SIZES:
            refuse("group_size is one of " + ", ".join(map(str, GROUP_SIZES)))
    elif "group_size" in options:
        refuse("group_size is int4's (weights per scale)")
    if kind == "share":
        bits = options.get("bits")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            refuse("bits is from 2 to 8 (2^bits shared values per layer)")
    if kind == "export" and options.get("format") not in ("onnx", "gguf"):
        refuse("format is onnx or gguf")
    if kind == "export" and options["format"] == "gguf":
        options["type"] = str(options.get("type", "q8_0")).lower()
        if options["type"] not in GGUF_TYPES:
            refuse("a GGUF export's type is " + " or ".join(GGUF_TYPES))
    elif kind == "export" and "type" in options:
        refuse("type is a GGUF export's (" + ", ".join(GGUF_TYPES) + ")")
    return options


MAX_STEPS = 100_000


def _distil_options(options: dict[str, Any], refuse) -> None:
    width = options.get("width")
    if width is not None and (not isinstance(width, int | float) or not 0 < width <= 1):
        refuse("width is the student's share of the teacher's channels, above 0 and at most 1")
    if "layers" in options and not _whole(options["layers"], 1, 64):
        refuse("layers is the student's number of conv blocks or layers, from 1")
    if "steps" in options and not _whole(options["steps"], 1, MAX_STEPS):
        refuse(f"steps is a whole number from 1 to {MAX_STEPS:,}")
    temperature = options.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or not 0 < temperature <= 100:
        refuse("temperature is above 0 and at most 100")
    alpha = options.get("alpha", 0.0)
    if not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        refuse("alpha weighs the teacher's soft targets against the labels: from 0 to 1")
    teacher = options.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        refuse("teacher is a model reference (name, name:version or name@alias)")


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
