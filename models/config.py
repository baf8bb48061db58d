"""Service configuration, read from the environment (prefix GROVE_) or a .env file.

The defaults are the embedded deployment: SQLite and the SQLite broker under var/. Production sets
DATABASE_URL=postgresql+psycopg://... and BROKER_URL=redis://... (with or without the GROVE_ prefix).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GROVE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///var/grove.db",
        validation_alias=AliasChoices("GROVE_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the job database.",
    )
    broker_url: str = Field(
        "sqla+sqlite:///var/broker.sqlite",
        validation_alias=AliasChoices("GROVE_BROKER_URL", "BROKER_URL"),
        description="Celery broker URL: redis://... in production, kombu's SQLAlchemy transport embedded.",
    )
    storage_dir: Path = Field(Path("var/storage"), description="Uploaded files and published artifacts.")
    model_store_dir: Path = Field(Path("var/models"), description="Base models, one directory per name.")
    work_dir: Path = Field(Path("var/work"), description="Worker scratch space (checkpoints, temp output).")
    model_import_dir: Path = Field(
        Path("var/import"),
        description="The only place `grove models import` reads a local SOURCE from (a Hugging Face directory, a "
        "GGUF file or a tar archive; symlinks resolved): a path outside it is refused. Uploads to POST /v1/models "
        "are staged here too.",
    )
    max_model_upload_bytes: int = Field(
        4 * 1024 * 1024 * 1024,
        ge=1,
        description="Largest archive or GGUF file POST /v1/models accepts; larger gets 413.",
    )
    model_import_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="Longest POST /v1/models may take to check (and, for a GGUF file, dequantize) a model.",
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload; larger gets 413.")
    max_upload_part_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Largest part of a multipart upload (POST /v1/uploads/{id}/parts), OpenAI's 64 MB; larger: 413.",
    )
    max_multipart_upload_bytes: int = Field(
        8 * 1024 * 1024 * 1024,
        ge=1,
        description="Largest file a multipart upload (POST /v1/uploads) may declare and assemble, OpenAI's 8 GB.",
    )
    upload_expiry_seconds: int = Field(
        3600,
        ge=1,
        description="A multipart upload not completed this long after its creation expires (OpenAI's hour): the "
        "reconciler deletes its parts.",
    )
    min_examples: int = Field(10, description="Fewest examples a training or validation file may hold.")
    max_example_chars: int = Field(
        1_000_000,
        ge=1,
        description="Most characters one training example may render to (its text_template filled in, or its "
        "messages, or prompt and completion together). A job with a longer example fails as a user error "
        "(example_too_large) before the worker builds it: a template that repeats a long field would otherwise "
        "grow one example to gigabytes.",
    )
    max_queued_jobs_per_project: int = Field(
        100, description="Unfinished (non-terminal) jobs of all kinds a project may hold at once; more gets 429."
    )
    max_json_body_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest request body of any route but the upload (JSON job specs and the like); larger gets 413.",
    )
    api_read_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads per API process that run JSON reads (status polls, lists, events). More threads "
        "than this only queue behind Python's GIL: on two cores 2 gave 1.09x the requests/s of 40 and a quarter "
        "of the p99 (docs/RELIABILITY.md, Load). Raise it when the database is far (each read waits a round trip).",
    )
    rate_limit: str | None = Field(
        "1200/minute",
        description="Requests each valid API key may make, in the limits library's notation ('100/second', "
        "'6000 per minute; 200 per second'); past it 429 with Retry-After. Empty or 'off': no limit per key.",
    )
    address_rate_limit: str | None = Field(
        "600/minute",
        description="Requests without a valid API key (none, unknown, revoked) each client address may make, in "
        "the same notation; past it 429 with Retry-After. Empty or 'off': not limited.",
    )
    auth_failure_rate_limit: str | None = Field(
        "120/minute",
        description="Requests with a key that fails authentication (unknown, revoked, malformed) each client "
        "address may make; past it they get 429 instead of 401. Valid keys from that address are not affected. "
        "Empty or 'off': not limited.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or CIDR networks of reverse proxies whose X-Forwarded-For names "
        "the client address the rate limits count. Empty: X-Forwarded-For is ignored and the peer's address is "
        "the client's.",
    )
    rate_limit_strategy: Literal["moving-window", "fixed-window"] = Field(
        "moving-window", description="How requests are counted: a moving window (exact) or fixed windows (cheaper)."
    )
    rate_limit_storage_url: str | None = Field(
        None,
        description="Where rate-limit counters live (redis://..., memory://). Unset: the broker's Redis when the "
        "broker is Redis (shared by all API processes), else each process's memory.",
    )
    lease_seconds: int = Field(120, description="A running job's lease; the worker renews it while alive.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Runs a job may start; one whose worker dies this often (out of memory, say) fails instead of "
        "being requeued forever.",
    )
    redispatch_after_seconds: int = Field(
        600, description="Re-send a queued job's message if no worker claimed it within this time."
    )
    reconcile_interval_seconds: float = Field(30.0, description="How often the reconciler runs.")
    run_reconciler: bool = Field(True, description="Run the reconciler inside each API process.")
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600,
        description="Redis redelivery timeout; above the longest job (the lease guards anyway).",
    )
    fine_tune_queue: str = Field("fine_tune", description="Celery queue that fine-tuning workers consume.")
    export_cpu_queue: str | None = Field(
        None, description="Celery queue of CPU export jobs; default: the fine-tune queue (any worker can build)."
    )
    export_cuda_queue: str = Field("export_cuda", description="Celery queue of CUDA export jobs (GPU workers).")
    trust_remote_code_models: str = Field(
        "",
        description="Comma-separated base model names (model store directories) allowed to run Python code shipped "
        "with their weights (transformers' trust_remote_code). Any other model that needs it is refused.",
    )
    torch_threads: int | None = Field(None, description="Threads for CPU training; default: all cores.")
    preload_training_libraries: bool = Field(
        True,
        description="A worker process imports torch, transformers and peft in the background as it starts "
        "(about 4 s on two cores), so that its first training or evaluation job does not wait for them.",
    )

    # Ecosystem (issue 7): maintenance queue, webhooks, live events, logs.
    maintenance_queue: str = Field(
        "maintenance", description="Celery queue of the beat's periodic tasks (reconciler, webhook deliveries)."
    )
    run_webhook_sender: bool = Field(
        True, description="Send due webhook deliveries from inside each API process (the embedded deployment)."
    )
    webhook_interval_seconds: float = Field(5.0, description="How often due webhook deliveries are sent.")
    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated webhook destinations allowed even on internal networks: host names, "
        "'*.example.com' wildcards, IP addresses or CIDR networks. Only these may use plain http.",
    )
    webhook_allow_public: bool = Field(
        True, description="Allow https webhook URLs whose host resolves only to public (globally routable) addresses."
    )
    webhook_timeout_seconds: float = Field(10.0, description="Timeout of one webhook delivery attempt.")
    webhook_max_attempts: int = Field(12, description="Attempts before a webhook delivery is marked failed.")
    webhook_retry_base_seconds: float = Field(10.0, description="First retry delay; doubles after each failure.")
    webhook_retry_max_seconds: float = Field(3600.0, description="Longest delay between two delivery attempts.")
    webhook_test_rate_limit: str = Field(
        "10/minute",
        description="Test deliveries (POST /v1/webhook_endpoints/{id}/test) each API key may send, in the limits "
        "library's notation; past it 429 with Retry-After. Each one is an outbound request the server makes.",
    )
    metrics_require_admin: bool = Field(
        False,
        description="GET /metrics answers only an admin key (Authorization: Bearer <admin key>). It shows every "
        "project's job counts and the workers' host names: turn this on in production unless only the "
        "monitoring network reaches the API. Off for the embedded run.",
    )
    sse_heartbeat_seconds: float = Field(15.0, description="Comment line sent on idle event streams this often.")
    max_streams_per_key: int = Field(
        8,
        ge=1,
        description="Event streams (GET .../events?stream=true) one API key may hold open at once in one API "
        "process; one more gets 429 too_many_streams.",
    )
    sse_key_recheck_seconds: float = Field(
        30.0, gt=0, description="How often an open event stream checks that its key is still valid (not revoked)."
    )
    sse_max_stream_seconds: float = Field(
        3600.0,
        gt=0,
        description="Longest an event stream stays open; the client then reconnects with Last-Event-ID.",
    )
    log_format: str = Field("json", description="Log lines as 'json' (one object per line) or 'text'.")
    log_level: str = Field("INFO", description="Log level of the API and worker processes.")

    # Artifact store (issue 7): a directory on a shared volume, or an S3-compatible bucket (models/storage_s3.py).
    storage_backend: Literal["local", "s3"] = Field(
        "local",
        description="Where uploads and results live: 'local' (GROVE_STORAGE_DIR, a disk or a volume the API and "
        "every worker mount) or 's3' (an S3-compatible bucket; GROVE_STORAGE_DIR then only stages files locally).",
    )
    s3_bucket: str | None = Field(
        None,
        description="Bucket of the s3 backend (it must exist). Credentials come from the standard AWS variables "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE) or the instance's role.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible service (MinIO, Ceph, R2, ...): http://minio:9000; unset: AWS."
    )
    s3_region: str | None = Field(None, description="Region of the bucket; unset: AWS_DEFAULT_REGION, the AWS config.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket (a folder, e.g. 'grove/'), to share a bucket.")
    s3_multipart_chunk_bytes: int = Field(
        64 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Objects larger than this move in parts of this size (multipart upload, ranged parallel download).",
    )
    s3_presigned_downloads: bool = Field(
        False,
        description="Answer file downloads with a 307 redirect to a presigned bucket URL instead of streaming them "
        "through the API (clients must follow redirects: curl -L).",
    )
    s3_presign_expiry_seconds: int = Field(300, ge=1, description="Lifetime of a presigned download URL.")

    # Relative paths (the embedded defaults) are resolved once, against the directory the process starts in. A
    # relative path handed on would mean something else to any code that runs elsewhere: the export's model builder
    # runs in its scratch directory, and an adapter's recorded base model path is read there (issue 17).
    @field_validator("storage_dir", "model_store_dir", "work_dir", "model_import_dir", mode="after")
    @classmethod
    def _absolute_directory(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url", "broker_url", mode="after")
    @classmethod
    def _absolute_sqlite_file(cls, value: str) -> str:
        return absolute_sqlite_url(value)


def absolute_sqlite_url(url: str) -> str:
    """`url` with a relative SQLite file made absolute (`sqla+sqlite:///var/broker.sqlite` too); any other URL as is."""
    transport, plus, rest = url.partition("+") if url.startswith("sqla+") else ("", "", url)
    if not rest.startswith("sqlite"):
        return url
    parsed = make_url(rest)
    path = parsed.database
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    absolute = parsed.set(database=str(Path(path).expanduser().resolve()))
    return transport + plus + absolute.render_as_string(hide_password=False)


@lru_cache
def get_settings() -> Settings:
    return Settings()
