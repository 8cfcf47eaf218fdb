"""The public documents of a task, declared once: the OpenAPI components (`app/openapi.py`) and
the Python client's models (`app/client.py`) are these classes.

Two readers, two needs. The OpenAPI document states the contract: every field the service
sends is required there, and closed sets (statuses, error sources) are enums. The client must
keep working against a newer service: it keeps unknown fields (`extra="allow"`), fields it
does not receive take their defaults, and closed sets are plain `str` in Python. So each field
has a tolerant Python type and, where that differs, the exact JSON Schema beside it
(`WithJsonSchema`); the schema is generated in serialization mode, where fields with defaults
count as required (`json_schema_serialization_defaults_required`).

Only pydantic is imported here: the client depends on nothing else of the service.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from common import lifecycle

# The statuses come from the lifecycle (common/lifecycle.py), in its order.
STATUSES = tuple(str(s) for s in lifecycle.Status)
FINAL_STATUSES = tuple(str(s) for s in lifecycle.Status if s in lifecycle.FINAL_STATUSES)
CALLBACK_EVENTS = ("started", "progress", "output")  # the final document is always sent
ERROR_SOURCES = ("service", "comfyui")
EVENT_ID_PATTERN = "^[0-9]{1,20}-[0-9]{1,20}$"

# Tolerant in Python, exact in the schema.
Status = Annotated[str, WithJsonSchema({"enum": list(STATUSES)})]
TaskId = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
Percent = Annotated[float, WithJsonSchema({"type": "number", "minimum": 0, "maximum": 100})]
Count = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]
# Always sent, though an older or newer service's document may lack it.
Timestamp = Annotated[datetime | None, WithJsonSchema({"type": "string", "format": "date-time"})]
Text = Annotated[str | None, WithJsonSchema({"type": "string"})]


def _const(value: str) -> Any:
    return Annotated[str, WithJsonSchema({"const": value})]


class Document(BaseModel):
    # Unknown fields are kept, not refused: the service adds fields without a new API version.
    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


class Progress(Document):
    """Job-wide progress: `percent` over the whole job (it only goes up), the node running and its step."""
    percent: Percent = 0.0
    node: str | None = None
    step: Count = 0
    max: Count = 0


class Image(Document):
    url: str = Field(description="Relative to the service unless it has a PUBLIC_URL.")
    content_type: str = "application/octet-stream"
    width: int | None = None
    height: int | None = None
    size: int | None = Field(None, description="Bytes.")


class TaskResult(Document):
    images: list[Image] = Field(default_factory=list)


class TaskError(Document):
    """Who failed and how: the inner object of the Error document, and a failed task's `error`."""
    source: Annotated[str, WithJsonSchema({"enum": list(ERROR_SOURCES)})] = Field(
        description="service: this service refused or failed it; comfyui: ComfyUI did.")
    code: str = Field(examples=["invalid_parameters", "execution_error"])
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict, description=(
        "invalid_parameters: errors [{field, message, type}]; unknown_gpu: available (the GPU queues and hosts the "
        "fleet has); ComfyUI validation: its error and node_errors as ComfyUI sent them; execution_error: node_id, "
        "node_type, exception_type, exception_message, traceback"))


class Error(Document):
    """Every error answer of every route."""
    model_config = ConfigDict(extra="forbid")
    error: TaskError


class Callback(Document):
    """The job's webhook and how the delivery of its final document went."""
    url: str
    events: list[Annotated[str, WithJsonSchema({"enum": list(CALLBACK_EVENTS)})]] = Field(default_factory=list)
    state: Annotated[str, WithJsonSchema({"enum": ["pending", "retrying", "delivered", "failed"]})] = "pending"
    attempts: Count = 0
    last_status: int | None = Field(None, description="The receiver's last HTTP status.")
    last_error: str | None = None
    delivered_at: datetime | None = None


class Task(Document):
    """The task document: GET /tasks/{id}, POST /generate, DELETE, the final SSE event and webhook."""
    task_id: TaskId
    # A plain str in Python: a state added later must not break an older client.
    status: Status = Field(description="queued → running → succeeded | failed | cancelled.")
    workflow: Text = None
    gpu: str | None = Field(None, description=(
        "The GPU queue (gpu.<host>.<index>) whose worker took the job; null while it still waits in Celery. A job "
        "waiting inside ComfyUI behind another is `queued` with `gpu` set."))
    queue_position: Count | None = Field(None, description=(
        "Jobs ahead of it on its GPU, the running one included (0: nothing ahead, it starts next); null unless "
        "queued."))
    progress: Progress | None = Field(None, description=(
        "null while queued, and for a job that failed or was cancelled before it ran."))
    waiting_reason: str | None = Field(None, description=(
        "Why a queued job waits beyond its place in line: no live GPU can run it now (its checkpoint, or its pin, "
        "is on GPUs that are down) and it waits for one to come back (WAIT_FOR_GPUS). null otherwise."))
    params: dict[str, Any] = Field(default_factory=dict, description="The parameters as used, the seed included.")
    created_at: Timestamp = None
    started_at: datetime | None = Field(None, description="When ComfyUI started it.")
    finished_at: datetime | None = None
    cancel_requested: bool = False
    result: TaskResult | None = Field(None, description="When succeeded.")
    error: TaskError | None = Field(None, description="When failed.")
    callback: Callback | None = Field(None, description="null without callback_url.")

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def images(self) -> list[Image]:
        return self.result.images if self.result else []


# -- Events: the data of each SSE event (and of the matching webhooks) --------------------------

class QueuedEvent(Document):
    """SSE `queued`: logged (with an id) when the job is queued or moved to another GPU; sent again
    without an id whenever its queue position or GPU changes."""
    task_id: TaskId
    status: _const("queued") = "queued"
    queue_position: Count | None = Field(None, description="As in Task.")
    gpu: str | None = Field(None, description="As in Task.")


class StartedEvent(Document):
    """SSE `started` (webhook `task.started` carries the Task instead): ComfyUI started the job
    (again, after a failover)."""
    task_id: TaskId
    status: _const("running") = "running"
    gpu: str


class ProgressEvent(Progress):
    """SSE `progress` (webhook `task.progress`)."""
    task_id: TaskId


class OutputEvent(Image):
    """SSE `output` (webhook `task.output`): one stored image, servable at `url` from now on."""
    task_id: TaskId
    index: Count


# The event stream, event by event: the name on its `event:` line and the model of its `data:`.
SSE_EVENTS: dict[str, type[Document]] = {
    "queued": QueuedEvent, "started": StartedEvent, "progress": ProgressEvent, "output": OutputEvent,
    **{status: Task for status in FINAL_STATUSES},
}


class WebhookEvent(Document):
    """What the service POSTs to a job's callback_url."""
    type: Annotated[str, WithJsonSchema({"enum": [f"task.{kind}" for kind in (*FINAL_STATUSES, *CALLBACK_EVENTS)]})]
    timestamp: datetime
    data: Task | ProgressEvent | OutputEvent = Field(description=(
        "task.succeeded/failed/cancelled/started: the Task document; task.progress: a ProgressEvent; task.output: an "
        "OutputEvent."))


# -- The fleet and its scaling decision: GET /api/v1/fleet (common/fleet.py, common/scaling.py) ----

Seconds = Annotated[float, WithJsonSchema({"type": "number", "minimum": 0})]
GPU_STATES = ("idle", "busy", "starting", "draining")
SCALE_ACTIONS = ("up", "down", "hold")


class FleetGpu(Document):
    """One live GPU as the scaling decision sees it."""
    queue: str = Field(description="Its GPU queue, gpu.<host>.<index>.")
    state: Annotated[str, WithJsonSchema({"enum": list(GPU_STATES)})] = Field(description=(
        "idle: no job; busy: a job waits or runs on it; starting: its worker is up, its ComfyUI not yet; "
        "draining: finishing what runs, taking nothing new (leaving)."))
    work_seconds: Seconds = Field(0.0, description="Predicted GPU seconds of the jobs waiting or running on it.")
    idle_seconds: Seconds = Field(0.0, description="How long it has had no job (0 while busy).")
    seconds_per_unit: float | None = Field(None, description="Its measured seconds per cost unit; null: no history.")
    checkpoint: str | None = Field(None, description="The model it holds warm.")


class Fleet(Document):
    """How many GPUs the fleet has, how many it should have (the comfy_fleet_desired_gpus gauge), and why."""
    current: Count = Field(description="Live GPUs that are not draining (ready or starting).")
    desired: Count = Field(description="GPUs the fleet should have now, within min_gpus … max_gpus.")
    action: Annotated[str, WithJsonSchema({"enum": list(SCALE_ACTIONS)})] = Field(
        description="up: desired > current; down: desired < current; hold.")
    reason: str = Field(description="The rule that decided, in words.")
    retire_first: str | None = Field(None, description="The GPU to retire first when scaling down; else null.")
    retire: list[str] = Field(default_factory=list, description=(
        "The GPUs to retire now, first first (current − desired of them when scaling down; else empty)."))
    work_seconds: Seconds = Field(0.0, description=(
        "Predicted GPU seconds of every job waiting or running: cost units × each GPU's measured seconds per unit."))
    stranded_seconds: Seconds = Field(0.0, description="Of which on the queues of GPUs that are down.")
    cold_start_seconds: Seconds = Field(0.0, description=(
        "A GPU's start to its first job: measured, else SCALE_COLD_START."))
    seconds_per_unit: Seconds = Field(0.0, description="What a GPU without history is assumed to take: the median.")
    target_wait_seconds: Seconds = Field(0.0, description="SCALE_TARGET_WAIT.")
    min_gpus: Count = Field(0, description="SCALE_MIN_GPUS.")
    max_gpus: Count = Field(0, description="SCALE_MAX_GPUS.")
    scale_down_delay_seconds: Seconds = Field(0.0, description="SCALE_DOWN_DELAY.")
    gpus: list[FleetGpu] = Field(default_factory=list, description="Every live GPU, by queue.")


# Every model the OpenAPI document names, in the order its components list them.
PUBLIC_MODELS: tuple[type[Document], ...] = (
    Error, Task, QueuedEvent, StartedEvent, ProgressEvent, OutputEvent, WebhookEvent, Fleet)


class _Contract(GenerateJsonSchema):
    """The schema as the service promises it: the Python defaults are the client's fallbacks, not
    part of the contract, and field titles repeat the names."""

    def default_schema(self, schema):
        return self.generate_inner(schema["schema"])

    def field_title_should_be_set(self, schema) -> bool:
        return False


def component_schemas(ref_template: str) -> dict[str, dict]:
    """Every public model and the models they use, as JSON Schemas by name."""
    _, top = models_json_schema([(model, "serialization") for model in PUBLIC_MODELS], ref_template=ref_template,
                                schema_generator=_Contract)
    return top["$defs"]
