"""Service configuration, read from the environment (prefix GROVE_) or a .env file.

The defaults are the embedded deployment: SQLite and the SQLite broker under var/. Production sets
DATABASE_URL=postgresql+psycopg://... and BROKER_URL=redis://... (with or without the GROVE_ prefix).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload; larger gets 413.")
    min_examples: int = Field(10, description="Fewest examples a training or validation file may hold.")
    max_queued_jobs_per_project: int = Field(100, description="Non-terminal jobs a project may hold at once.")
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
    trust_remote_code: bool = Field(False, description="Allow models whose code ships with their weights.")
    torch_threads: int | None = Field(None, description="Threads for CPU training; default: all cores.")

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
    sse_heartbeat_seconds: float = Field(15.0, description="Comment line sent on idle event streams this often.")
    log_format: str = Field("json", description="Log lines as 'json' (one object per line) or 'text'.")
    log_level: str = Field("INFO", description="Log level of the API and worker processes.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
