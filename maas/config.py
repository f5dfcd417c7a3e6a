"""Settings for the server and the CLI.

Every field reads from an environment variable with the ``MAAS_`` prefix (``MAAS_HOME``,
``MAAS_DATABASE_URL``, ...). Paths are resolved to absolute paths and derived defaults are
filled in once, at construction, so the rest of the code never has to guess.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024**2
GiB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAAS_", use_attribute_docstrings=True, extra="ignore"
    )

    home: Path = Path(".maas")
    """Folder for everything maas keeps: database, artifacts, secrets. Relative paths are
    taken from the current folder, so the default is ``./.maas``."""

    database_url: str = ""
    """SQLAlchemy URL of the database. Empty means a SQLite file ``maas.db`` under ``home``;
    use ``postgresql+psycopg://user:pass@host/db`` for PostgreSQL (extra ``postgres``)."""

    artifact_root: Path | None = None
    """Folder holding model versions (one sub-folder per model and version). Empty means
    ``artifacts`` under ``home``."""

    host: str = "127.0.0.1"
    """Address the server binds to. The default is loopback only."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port the server listens on."""

    log_level: str = Field(default="info", pattern="^(critical|error|warning|info|debug)$")
    """Server log level: critical, error, warning, info or debug. The processes the server
    starts (an LLM's engine process, a model's pipeline stages) log at the same level to the same
    output, each line with the process's name, e.g. `INFO: (engine-smollm2-135m-instruct:1) ...
    ready in 33.1s`."""

    # 16 GiB holds a 7B model in 16 bits, yet an import (upload, unpacked copy, version) still
    # fits on a laptop's free disk. Raise both for bigger models on a bigger disk.
    max_archive_bytes: int = Field(default=16 * GiB, gt=0)
    """Largest total uncompressed size accepted when importing a .tar.gz or .zip archive;
    counted while unpacking, so a header that understates a size does not get past it."""

    max_archive_members: int = Field(default=100_000, gt=0)
    """Largest number of entries accepted in an imported archive."""

    max_archive_ratio: int = Field(default=200, ge=1)
    """Largest compression ratio (unpacked / packed size) of an imported archive, per zip entry
    and for the whole archive, against decompression bombs. Sizes up to 1 MiB pass whatever
    their ratio (small JSON files compress very well); model weights rarely pass 2."""

    max_upload_bytes: int = Field(default=16 * GiB, gt=0)
    """Largest model file accepted by the upload route of the management API."""

    max_file_bytes: int = Field(default=1 * GiB, gt=0)
    """Largest file accepted by ``POST /v1/files`` (training data, batch input)."""

    fine_tune_max_chat_chars: int = Field(default=65_536, ge=1, le=10**8)
    """Longest chat (characters of all its messages) in a fine-tuning file; a longer one is
    reported with its line number at upload."""

    max_request_bytes: int = Field(default=32 * MiB, gt=0)
    """Largest request body on every other route; a bigger one gets 413 before it is read."""

    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Extra names accepted in the Host header, comma-separated. Bound to loopback, only
    localhost, 127.0.0.1 and ::1 are accepted otherwise (against DNS rebinding); ``*`` turns
    the check off."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to call the API, comma-separated; empty means no CORS.
    Credentials (cookies) are never allowed cross-origin: keys travel in the Authorization
    header."""

    metrics_public: bool = False
    """Serve /metrics without a key (for a Prometheus on a private network). Otherwise it
    needs an admin key."""

    secret_key: SecretStr | None = None
    """Server secret that API key hashes are keyed with. Empty means a random one kept in
    ``secret.key`` under ``home`` (mode 0600); set it when several servers share a database."""

    model_memory_bytes: int = Field(default=0, ge=0)
    """Memory that loaded models (classic and text-generation, weights and KV cache) may take
    together; the least recently used idle model is unloaded to make room. 0 means half of the
    machine's memory."""

    pin_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model references loaded at start and never unloaded, comma-separated
    (e.g. ``all-minilm-l6-v2,resnet@production``)."""

    inference_threads: int = Field(default=0, ge=0)
    """Threads one forward pass may use (torch, onnxruntime). 0 means every core."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Default rows per forward pass for classic models; 1 turns batching off. A model's
    own setting (management API) wins."""

    max_delay_ms: float = Field(default=5.0, ge=0, le=10_000)
    """Default time the oldest request may wait for others to join its batch."""

    max_queue_rows: int = Field(default=4096, ge=1)
    """Default rows that may wait for a model; past it, requests get 503 with Retry-After."""

    llm_dtype: str = Field(default="auto", pattern="^(auto|float32|bfloat16|int8-weight|int8)$")
    """Compute type of text-generation models: auto (time each of the others at load and keep
    the fastest that keeps float32's next-token choices on a probe text), float32, bfloat16,
    int8-weight (int8 weights, bfloat16 activations), or int8 (W8A8 linear layers on the
    CPU's int8 units, as CTranslate2's int8)."""

    llm_kv_cache_dtype: str = Field(default="auto", pattern="^(auto|float32|bfloat16)$")
    """What text-generation models keep keys and values in, as vLLM's ``--kv-cache-dtype``:
    auto (the activations' dtype: float32 for float32 and int8, bfloat16 for the others),
    float32, or bfloat16 (half the memory of a float32 cache, at a small cost in quality;
    with ``llm_dtype=auto`` every candidate is measured with it)."""

    llm_draft: str = Field(default="auto", pattern="^(auto|off|bfloat16|int8-weight|int8)$")
    """Speculative decoding for text-generation models on maas's engine, as vLLM's
    ``speculative_config`` and llama.cpp's draft model: the served model again in this dtype
    proposes up to ``llm_speculative_tokens`` tokens that the model checks in one step, when one
    greedy sequence runs alone. Outputs are unchanged. auto: an int8 draft for a model that
    runs float32 (not a pipeline stage, weights not stored quantized), none otherwise; off:
    none."""

    llm_speculative_tokens: int = Field(default=8, ge=1, le=16)
    """Most tokens the draft model proposes each round."""

    llm_draft_min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """A round's proposal ends after a token the draft gives less than this probability
    (llama.cpp's ``--draft-p-min``): past a guess it is unsure of, the rest are likelier
    wasted than accepted. 0 always proposes ``llm_speculative_tokens``."""

    llm_compile: bool = True
    """Compile each text-generation model's decode step with torch.compile (inductor, needs a
    C++ compiler) at load; false, or a failed compilation, runs it eagerly."""

    llm_paged_attention: bool = True
    """Decode attention of text-generation models reads each cached block in place, with a
    C kernel built at first use by the system C compiler (kept in ``MAAS_CACHE_DIR``, default
    ~/.cache/maas); false, or no compiler, gathers the blocks first."""

    llm_max_sequences: int = Field(default=32, ge=1, le=1024)
    """Sequences a text-generation model runs at once; more wait."""

    llm_max_model_len: int = Field(default=2048, ge=16)
    """Prompt plus output tokens per sequence, at most (capped by the model's context)."""

    llm_kv_cache_bytes: int = Field(default=0, ge=0)
    """Memory the paged KV cache of one text-generation model may take. 0 means what
    ``llm_max_sequences`` sequences of the whole context need, at most a quarter of the
    machine's memory. When blocks run out, the newest sequence is preempted and recomputed
    later; a sequence may not outgrow the whole cache."""

    llm_kv_block_size: int = Field(default=16, ge=1, le=1024)
    """Positions per KV cache block (and per prefix-cache entry)."""

    llm_kv_cache_commit: bool = False
    """Commit the whole KV cache when a model loads (first requests never wait for page faults,
    but an idle model holds it all) instead of as blocks are first written."""

    llm_max_batch_tokens: int = Field(default=512, ge=16)
    """Tokens in one engine step: every decoding sequence's next token, then prompt chunks."""

    llm_max_waiting_sequences: int = Field(default=256, ge=0, le=1_000_000)
    """Sequences of a text-generation model that may wait to run; past it, new
    requests get 503 with Retry-After at once instead of queueing until their deadline."""

    llm_max_request_sequences: int = Field(default=64, ge=1, le=100_000)
    """Sequences one completion request may start (prompts x n); more is a 400."""

    llm_engine_process: bool = True
    """Run each text-generation model's engine in a process of its own (faster on a CPU: no
    contention with the server for the GIL). false runs it on a thread of the server: one
    process, less memory (the demo: about 220 MiB)."""

    llm_pipeline_stages: int = Field(default=1, ge=1, le=64)
    """Split each text-generation model served by maas's engine into this many pipeline
    stages, each a process holding about 1/K of the weights and the KV cache of its own
    layers (maas.distributed); the engine keeps K micro-batches in flight so the stages work
    at once. 1 runs the model whole. Needs ``llm_engine_process``; with ``llm_dtype=auto``
    the stages run float32 (auto measures the whole model in one process)."""

    ray_address: str = ""
    """A Ray cluster to place distributed work on: ``auto`` (the cluster this machine joined
    with ``ray start``) or the head's ``host:port``. Training jobs with ``world_size`` > 1 then
    run their processes as Ray actors, and LLM pipeline stages after the first run as Ray
    actors, one placement-group bundle each, spread across the nodes. Every node must see the
    same ``MAAS_HOME``. Empty: processes on this machine. Needs ``pip install ray``."""

    shutdown_timeout: float = Field(default=30.0, ge=0, le=86_400)
    """Seconds that running requests, streams included, get to finish after a stop signal
    (SIGTERM or Ctrl-C) while new ones get 503; a second signal stops at once."""

    request_timeout_s: float = Field(default=600.0, gt=0)
    """A generation still running after this long is stopped with a timeout error."""

    job_workers: int = Field(default=1, ge=0, le=64)
    """Worker processes ``maas serve`` starts for jobs (training, fine-tuning); 0 starts none
    (run ``maas worker`` elsewhere). Each takes one job at a time."""

    job_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Modules (comma-separated) whose ``JOB_KINDS`` add kinds of job to the built-in ones; the
    server and every worker import them. Operators' own code: set it only to code you trust."""

    job_lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    """How long a worker's claim on a job lasts without a heartbeat (sent every third of it).
    A worker that dies loses the job this long after its last heartbeat; another then resumes
    it from its last checkpoint."""

    job_max_attempts: int = Field(default=3, ge=1, le=100)
    """Claims a job may have: a job whose workers died this many times fails."""

    job_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    """How often an idle worker looks for a job."""

    encryption_key_file: Path | None = None
    """Master key file for weights encrypted at rest (``maas keys init-master`` makes one).
    Empty means ``master.keys`` under ``home`` if that file exists, else no encryption."""

    @field_validator("allowed_hosts", "cors_origins", "pin_models", "job_plugins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.artifact_root is None:
            self.artifact_root = self.home / "artifacts"
        self.artifact_root = self.artifact_root.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'maas.db'}"
        if self.encryption_key_file is None and (self.home / "master.keys").exists():
            self.encryption_key_file = self.home / "master.keys"
        if self.encryption_key_file is not None:
            self.encryption_key_file = self.encryption_key_file.expanduser().resolve()
        if self.model_memory_bytes == 0:
            self.model_memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        if self.inference_threads == 0:
            self.inference_threads = os.cpu_count() or 1
        if self.llm_pipeline_stages > 1 and not self.llm_engine_process:
            raise ValueError(
                "MAAS_LLM_PIPELINE_STAGES above 1 needs MAAS_LLM_ENGINE_PROCESS=true: "
                "each stage is a process"
            )
        return self

    @property
    def bound_to_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def artifacts(self) -> Path:
        """The artifact root (set by the validator when left empty)."""
        return self.artifact_root or self.home / "artifacts"


def settings_table() -> str:
    """The Markdown table of every setting, for docs/configuration.md (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        value = field.get_default(call_default_factory=True)
        if isinstance(value, list):
            shown = f"`{','.join(map(str, value))}`" if value else "(empty)"
        else:
            shown = "(derived)" if value in (None, "") else f"`{value}`"
        meaning = " ".join((field.description or "").split())
        rows.append(f"| `MAAS_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
