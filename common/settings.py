"""Every setting of comfy-service, read from environment variables (the README lists them)."""
from __future__ import annotations

import socket
from functools import cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Where jobs and their state live. `make run` starts a private Redis when this is unset.
    # Or Sentinels that name the master: sentinel://[:password@]host:port,host:port/db
    # (common/redis_conn.py; the password is the master's, the Sentinels' own is below).
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    redis_sentinel_master: str = Field("mymaster", min_length=1, validation_alias="REDIS_SENTINEL_MASTER")
    redis_sentinel_password: SecretStr = Field(SecretStr(""), validation_alias="REDIS_SENTINEL_PASSWORD",
                                               description="Sentinels' requirepass; empty: none.")

    # A job is accepted (202) only once this many Redis replicas hold it (WAIT, up to
    # REDIS_REPLICA_WAIT seconds; else 503 not_replicated): with Sentinel, a failover then loses no
    # accepted job. 0: no wait.
    redis_min_replicas: int = Field(0, ge=0, validation_alias="REDIS_MIN_REPLICAS")
    redis_replica_wait: float = Field(1.0, gt=0, validation_alias="REDIS_REPLICA_WAIT")

    # The API.
    api_host: str = Field("127.0.0.1", validation_alias="API_HOST")
    api_port: int = Field(8080, validation_alias="API_PORT")
    public_url: str = Field("", validation_alias="PUBLIC_URL", description="Prefix for absolute image URLs.")
    max_body_bytes: int = Field(1_048_576, validation_alias="MAX_BODY_BYTES")
    # Redis connections one API process opens for requests (a request waits for a free one);
    # event streams have their own, one per open stream (SSE_MAX_STREAMS).
    redis_max_connections: int = Field(200, ge=4, validation_alias="REDIS_MAX_CONNECTIONS")

    # Security (docs/security.md). Keys: API_KEYS="name:key,..." and/or hashed keys in Redis
    # (`python -m app.keys add NAME`, preferred). No keys at all: open, so bind to loopback.
    api_keys: SecretStr = Field(SecretStr(""), validation_alias="API_KEYS")
    # Per caller (key name, or client address without keys); "" or "off" disables.
    rate_limit: str = Field("1200/minute", validation_alias="RATE_LIMIT", description="All /api/v1 routes.")
    rate_limit_generate: str = Field("120/minute", validation_alias="RATE_LIMIT_GENERATE")
    # Jobs not yet finished (queued or running); 0 = no cap.
    max_active_jobs_per_key: int = Field(100, ge=0, validation_alias="MAX_ACTIVE_JOBS_PER_KEY")
    max_active_jobs: int = Field(10_000, ge=0, validation_alias="MAX_ACTIVE_JOBS")
    allow_raw_workflows: bool = Field(False, validation_alias="ALLOW_RAW_WORKFLOWS")
    raw_node_allowlist: str = Field(
        "CheckpointLoaderSimple,CLIPTextEncode,EmptyLatentImage,KSampler,VAEDecode,SaveImage,PreviewImage,"
        "StoryDiffusion_Apply,StoryDiffusion_CLIPTextEncode,StoryDiffusion_KSampler",
        validation_alias="RAW_NODE_ALLOWLIST")
    cors_origins: str = Field("", validation_alias="CORS_ORIGINS", description="Comma list; empty: CORS off.")
    # Proxies whose X-Forwarded-For is believed (app/proxies.py): addresses, networks or host
    # names, comma-separated. Empty: the peer address is the caller.
    trusted_proxies: str = Field("", validation_alias="TRUSTED_PROXIES")

    # A worker: the one ComfyUI it drives and the GPU queue it consumes.
    comfyui_url: str = Field("http://127.0.0.1:8188", validation_alias="COMFYUI_URL")
    worker_host: str = Field(default_factory=socket.gethostname, validation_alias="WORKER_HOST")
    gpu_index: int = Field(0, validation_alias="GPU_INDEX")
    gpu_queue: str = Field("", validation_alias="GPU_QUEUE", description="Default gpu.<host>.<index>.")
    # Prompts a worker keeps inside ComfyUI at once: the running one plus the next, so the GPU
    # never waits for the service between jobs.
    worker_concurrency: int = Field(2, ge=1, le=8, validation_alias="WORKER_CONCURRENCY")
    heartbeat_interval: float = Field(2.0, gt=0, validation_alias="HEARTBEAT_INTERVAL")
    heartbeat_ttl: float = Field(10.0, gt=0, validation_alias="HEARTBEAT_TTL")
    # Failover: how often one job may be started (a worker crash or a lost ComfyUI counts).
    max_attempts: int = Field(3, ge=1, le=20, validation_alias="MAX_ATTEMPTS")
    # A job its worker does not account for (not in its heartbeat's running list) is checked
    # against its ComfyUI once it has been taken this long (common/reconcile.py).
    reconcile_grace: float = Field(5.0, gt=0, validation_alias="RECONCILE_GRACE")
    # Workers wait out a Redis outage this long before a job's state change gives up (the
    # prompt keeps running meanwhile; its result is recorded once Redis is back).
    redis_outage_tolerance: float = Field(120.0, ge=0, validation_alias="REDIS_OUTAGE_TOLERANCE")
    comfyui_unreachable_deadline: float = Field(60.0, gt=0, validation_alias="COMFYUI_UNREACHABLE_DEADLINE")
    comfyui_stall_timeout: float = Field(60.0, gt=0, validation_alias="COMFYUI_STALL_TIMEOUT")

    # Autoscaling (common/scaling.py): the decision the API exports for KEDA and `make run`.
    scale_target_wait: float = Field(60.0, gt=0, validation_alias="SCALE_TARGET_WAIT",
                                     description="Seconds a job should wait at most for a GPU.")
    scale_min_gpus: int = Field(0, ge=0, validation_alias=AliasChoices("SCALE_MIN_GPUS", "AUTOSCALE_MIN"))
    scale_max_gpus: int = Field(8, ge=1, validation_alias=AliasChoices("SCALE_MAX_GPUS", "AUTOSCALE_MAX"))
    # Until a GPU reports its measured cold start (ComfyUI start plus model load).
    scale_cold_start: float = Field(120.0, ge=0, validation_alias="SCALE_COLD_START")
    scale_down_delay: float = Field(300.0, ge=0, validation_alias="SCALE_DOWN_DELAY",
                                    description="Seconds a GPU must be idle before it may be retired.")
    # How the API picks a GPU (common/dispatch.py): expected_finish (the service's); round_robin and
    # gpu_cpu_load exist as baselines for the benchmark.
    dispatch_policy: Literal["expected_finish", "round_robin", "gpu_cpu_load"] = Field(
        "expected_finish", validation_alias="DISPATCH_POLICY")
    # How often a worker re-reads the checkpoints its ComfyUI has (GET /object_info), for its heartbeat.
    checkpoints_refresh: float = Field(60.0, gt=0, validation_alias="CHECKPOINTS_REFRESH")
    # A fleet whose GPUs come and go (an autoscaler, scale to zero): a job that no live GPU can take
    # but one the fleet has had could waits for it (queued on that GPU) instead of a 503.
    wait_for_gpus: bool = Field(False, validation_alias="WAIT_FOR_GPUS")

    # Jobs.
    job_timeout: float = Field(3600.0, gt=0, validation_alias="JOB_TIMEOUT", description="Longest run on ComfyUI.")
    # Must exceed the longest job, or Redis redelivers a running job (Celery's known trap).
    visibility_timeout: float = Field(4 * 3600.0, gt=0, validation_alias="VISIBILITY_TIMEOUT")
    result_ttl: int = Field(7 * 24 * 3600, gt=0, validation_alias="RESULT_TTL", description="Task records expire.")
    progress_interval: float = Field(0.0, ge=0, validation_alias="PROGRESS_INTERVAL")
    comfyui_timeout: float = Field(10.0, gt=0, validation_alias="COMFYUI_TIMEOUT", description="Per HTTP call.")

    # The event stream (GET /api/v1/tasks/{id}/events) and each job's event log behind it.
    events_ttl: int = Field(3600, gt=0, validation_alias="EVENTS_TTL",
                            description="Seconds a finished job's event log is kept (then: its record).")
    sse_keepalive: float = Field(15.0, gt=0, validation_alias="SSE_KEEPALIVE")
    sse_max_streams: int = Field(1000, ge=1, validation_alias="SSE_MAX_STREAMS",
                                 description="Open event streams per API process; more get 503.")
    sse_max_seconds: float = Field(3600.0, gt=0, validation_alias="SSE_MAX_SECONDS",
                                   description="A stream closes after this; the client resumes.")

    # Webhooks (docs/api.md): signed per Standard Webhooks, delivered by `python -m workers.webhooks`.
    webhook_secret: SecretStr = Field(SecretStr(""), validation_alias="WEBHOOK_SECRET",
                                      description="whsec_<base64>; a comma list signs with each (rotation).")
    webhook_allowed_hosts: str = Field("", validation_alias="WEBHOOK_ALLOWED_HOSTS",
                                       description="Comma list: host, host:port, *.domain. Empty: callbacks refused.")
    webhook_queue: str = Field("cs.webhooks", validation_alias="WEBHOOK_QUEUE")
    webhook_timeout: float = Field(10.0, gt=0, validation_alias="WEBHOOK_TIMEOUT")
    webhook_max_attempts: int = Field(8, ge=1, le=30, validation_alias="WEBHOOK_MAX_ATTEMPTS")
    webhook_backoff: float = Field(2.0, gt=0, validation_alias="WEBHOOK_BACKOFF",
                                   description="Seconds before the 2nd attempt; doubles each time.")
    webhook_backoff_max: float = Field(600.0, gt=0, validation_alias="WEBHOOK_BACKOFF_MAX")
    webhook_progress_interval: float = Field(2.0, ge=0, validation_alias="WEBHOOK_PROGRESS_INTERVAL")
    webhook_concurrency: int = Field(8, ge=1, le=256, validation_alias="WEBHOOK_CONCURRENCY")
    webhook_resend_after: float = Field(300.0, gt=0, validation_alias="WEBHOOK_RESEND_AFTER",
                                        description="A final webhook not settled this long is queued again.")

    # Output files.
    storage_backend: str = Field("local", validation_alias="STORAGE_BACKEND")
    storage_dir: str = Field("var/outputs", validation_alias="STORAGE_DIR")
    s3_bucket: str = Field("", validation_alias="S3_BUCKET")
    s3_prefix: str = Field("comfy-service/", validation_alias="S3_PREFIX")
    s3_endpoint_url: str = Field("", validation_alias="S3_ENDPOINT_URL")
    s3_region: str = Field("us-east-1", validation_alias="S3_REGION")

    # Flower (operators' view of Celery).
    flower_address: str = Field("127.0.0.1", validation_alias="FLOWER_ADDRESS")
    flower_port: int = Field(5555, validation_alias="FLOWER_PORT")
    flower_basic_auth: str = Field("", validation_alias="FLOWER_BASIC_AUTH", description="user:password[,user2:pw2]")
    flower_db: str = Field("var/flower.db", validation_alias="FLOWER_DB")

    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    # Logs (common/logs.py): rotating files under LOG_DIR (empty: none), JSON lines on demand, logdy.
    log_dir: str = Field("var/logs", validation_alias="LOG_DIR")
    log_json: bool = Field(False, validation_alias="LOG_JSON")
    log_file_rotation: str = Field("20 MB", validation_alias="LOG_FILE_ROTATION", description="Size per file.")
    log_file_retention: str = Field("5", validation_alias="LOG_FILE_RETENTION",
                                    description="Rotated files kept (a count) or how long ('7 days').")
    logdy_address: str = Field("", validation_alias="LOGDY_ADDRESS", description="host:port of logdy's socket input.")

    @field_validator("storage_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ("local", "s3"):
            raise ValueError("STORAGE_BACKEND must be 'local' or 's3'")
        return value

    @model_validator(mode="after")
    def _scale_bounds(self) -> "Settings":
        if self.scale_min_gpus > self.scale_max_gpus:
            raise ValueError("SCALE_MIN_GPUS must not exceed SCALE_MAX_GPUS")
        return self
    @field_validator("redis_url")
    @classmethod
    def _readable_redis_url(cls, value: str) -> str:
        from common.redis_conn import parse_sentinel_url  # raises on a malformed sentinel:// URL

        parse_sentinel_url(value)
        return value

    @property
    def queue_name(self) -> str:
        return self.gpu_queue or f"gpu.{self.worker_host}.{self.gpu_index}"


@cache
def get_settings() -> Settings:
    return Settings()
