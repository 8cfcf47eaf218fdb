"""Typed values returned by the ComfyUI client (plain frozen dataclasses)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Started:
    prompt_id: str
    timestamp: Optional[int] = None  # epoch ms (server clock)


@dataclass(frozen=True)
class Cached:
    prompt_id: str
    nodes: list[str]


@dataclass(frozen=True)
class Executing:
    prompt_id: str
    node: str
    display_node: Optional[str] = None
    replayed: bool = False  # the server's replay to a reconnecting socket (no prompt_id in it)


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    node: Optional[str]
    value: int
    max: int


@dataclass(frozen=True)
class Executed:
    prompt_id: str
    node: str
    display_node: Optional[str]
    output: dict[str, Any]


@dataclass(frozen=True)
class Preview:
    """A binary preview frame (only with ``ComfyClient(previews=True)``)."""
    prompt_id: str
    node: Optional[str]
    image_type: str  # e.g. "image/jpeg"
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Succeeded:
    prompt_id: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "ws"  # "ws": seen live; "history": settled from /history


@dataclass(frozen=True)
class Failed:
    prompt_id: str
    node_id: Optional[str]
    node_type: Optional[str]
    exception_type: Optional[str]
    exception_message: Optional[str]
    traceback: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    current_inputs: dict[str, Any] = field(default_factory=dict)
    source: str = "ws"

    def payload(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "node_type": self.node_type, "exception_type": self.exception_type,
                "exception_message": self.exception_message, "traceback": self.traceback,
                "executed": self.executed, "current_inputs": self.current_inputs}


@dataclass(frozen=True)
class Interrupted:
    prompt_id: str
    node_id: Optional[str] = None
    node_type: Optional[str] = None
    executed: list[str] = field(default_factory=list)
    source: str = "ws"
    deleted: bool = False  # removed from the queue by cancel() before it ran

    def payload(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "node_type": self.node_type, "executed": self.executed,
                "reason": "deleted" if self.deleted else "interrupted"}


Event = Union[Started, Cached, Executing, Progress, Executed, Preview, Succeeded, Failed, Interrupted]
TerminalEvent = Union[Succeeded, Failed, Interrupted]
TERMINAL_TYPES = (Succeeded, Failed, Interrupted)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Submission:
    prompt_id: str
    number: Optional[int]
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: Optional[dict[str, Any]] = None
    cached_nodes: list[str] = field(default_factory=list)
    source: str = "ws"

    @property
    def ok(self) -> bool:
        return self.status == "success"


class CancelOutcome(str, enum.Enum):
    DELETED = "deleted"          # was pending; removed from the queue, will never run
    INTERRUPTED = "interrupted"  # was running; interrupt requested for this prompt only
    FINISHED = "finished"        # already in history: nothing to cancel
    NOT_FOUND = "not_found"      # ComfyUI does not know it

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    kind: str  # the output key: "images", "gifs", "videos", "audio", ...
    filename: str
    subfolder: str
    type: str  # "output" | "temp" | "input"
    content_type: str  # from /view's Content-Type (application/octet-stream if none)
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class LogEntry:
    t: str  # ISO time from the server
    m: str  # the line (usually ends with a newline)


# --------------------------------------------------------------------------- thin calls
@dataclass(frozen=True)
class QueueItem:
    number: int
    prompt_id: str
    graph: dict[str, Any] = field(repr=False)
    extra_data: dict[str, Any] = field(default_factory=dict)
    outputs_to_execute: list[str] = field(default_factory=list)

    @classmethod
    def from_raw(cls, item: list | tuple) -> "QueueItem":
        item = list(item) + [None] * 5
        return cls(number=item[0], prompt_id=str(item[1]), graph=item[2] or {}, extra_data=item[3] or {},
                   outputs_to_execute=list(item[4] or []))

    @property
    def client_id(self) -> Optional[str]:
        return self.extra_data.get("client_id")


@dataclass(frozen=True)
class QueueState:
    running: list[QueueItem]
    pending: list[QueueItem]  # sorted by number (execution order)

    def running_ids(self) -> list[str]:
        return [i.prompt_id for i in self.running]

    def pending_ids(self) -> list[str]:
        return [i.prompt_id for i in self.pending]

    def contains(self, prompt_id: str) -> bool:
        return prompt_id in self.running_ids() or prompt_id in self.pending_ids()


@dataclass(frozen=True)
class HistoryEntry:
    prompt_id: str
    number: Optional[int]
    graph: dict[str, Any] = field(repr=False)
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    outputs: dict[str, dict[str, Any]]
    status_str: Optional[str]
    completed: bool
    messages: list[tuple[str, dict[str, Any]]] = field(repr=False)
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def from_raw(cls, prompt_id: str, raw: dict[str, Any]) -> "HistoryEntry":
        prompt = list(raw.get("prompt") or []) + [None] * 5
        status = raw.get("status") or {}
        messages = []
        for m in status.get("messages") or []:
            if isinstance(m, (list, tuple)) and len(m) >= 2:
                messages.append((str(m[0]), m[1] if isinstance(m[1], dict) else {}))
        return cls(prompt_id=prompt_id, number=prompt[0], graph=prompt[2] or {}, extra_data=prompt[3] or {},
                   outputs_to_execute=list(prompt[4] or []), outputs=raw.get("outputs") or {},
                   status_str=status.get("status_str"), completed=bool(status.get("completed")),
                   messages=messages, meta=raw.get("meta") or {})

    @property
    def outcome(self) -> str:
        """"success", "interrupted" or "error" (told apart by the LAST status message)."""
        if self.status_str == "success":
            return "success"
        last = self.messages[-1][0] if self.messages else None
        if last == "execution_interrupted":
            return "interrupted"
        return "error"

    def message(self, kind: str) -> Optional[dict[str, Any]]:
        for name, data in reversed(self.messages):
            if name == kind:
                return data
        return None

    @property
    def cached_nodes(self) -> list[str]:
        data = self.message("execution_cached")
        return list(data.get("nodes") or []) if data else []

    def terminal_event(self) -> TerminalEvent:
        if self.outcome == "success":
            return Succeeded(self.prompt_id, outputs=self.outputs, source="history")
        if self.outcome == "interrupted":
            d = self.message("execution_interrupted") or {}
            return Interrupted(self.prompt_id, node_id=d.get("node_id"), node_type=d.get("node_type"),
                               executed=list(d.get("executed") or []), source="history")
        d = self.message("execution_error")
        if d is None:
            return Failed(self.prompt_id, node_id=None, node_type=None, exception_type="UnknownError",
                          exception_message=f"ComfyUI recorded status {self.status_str!r} without an error message",
                          source="history")
        return Failed(self.prompt_id, node_id=d.get("node_id"), node_type=d.get("node_type"),
                      exception_type=d.get("exception_type"), exception_message=d.get("exception_message"),
                      traceback=list(d.get("traceback") or []), executed=list(d.get("executed") or []),
                      current_inputs=d.get("current_inputs") or {}, source="history")


@dataclass(frozen=True)
class Device:
    name: str
    type: str
    index: Optional[int]
    vram_total: Optional[int]
    vram_free: Optional[int]
    torch_vram_total: Optional[int] = None
    torch_vram_free: Optional[int] = None


@dataclass(frozen=True)
class SystemStats:
    comfyui_version: Optional[str]
    python_version: Optional[str]
    pytorch_version: Optional[str]
    os: Optional[str]
    ram_total: Optional[int]
    ram_free: Optional[int]
    devices: list[Device]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> "SystemStats":
        s = raw.get("system") or {}
        devices = [Device(name=d.get("name"), type=d.get("type"), index=d.get("index"),
                          vram_total=d.get("vram_total"), vram_free=d.get("vram_free"),
                          torch_vram_total=d.get("torch_vram_total"), torch_vram_free=d.get("torch_vram_free"))
                   for d in raw.get("devices") or [] if isinstance(d, dict)]
        return cls(comfyui_version=s.get("comfyui_version"), python_version=s.get("python_version"),
                   pytorch_version=s.get("pytorch_version"), os=s.get("os"), ram_total=s.get("ram_total"),
                   ram_free=s.get("ram_free"), devices=devices, raw=raw)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    display_name: Optional[str]
    category: Optional[str]
    output_node: bool
    input: dict[str, Any] = field(repr=False)
    output: list[str] = field(repr=False)
    output_name: list[str] = field(repr=False)
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_raw(cls, name: str, raw: dict[str, Any]) -> "NodeInfo":
        return cls(name=raw.get("name") or name, display_name=raw.get("display_name"), category=raw.get("category"),
                   output_node=bool(raw.get("output_node")), input=raw.get("input") or {},
                   output=list(raw.get("output") or []), output_name=list(raw.get("output_name") or []), raw=raw)
