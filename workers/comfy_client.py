"""The ComfyUI boundary client: submit workflows, follow them, fetch outputs, cancel.

Design (ComfyUI 0.8 protocol, see tests/transcripts/PROTOCOL.md):

* **One reader thread per client owns the websocket** (``/ws?clientId=<client_id>``) and
  demultiplexes messages by ``prompt_id`` into per-prompt queues ("watches"). Several
  prompts of one client can be in flight (one running, the next already queued inside
  ComfyUI); each caller iterates only its own prompt's events. Messages of prompts nobody
  watches are dropped, and each watch's buffer is bounded.
* **Prompt ids are generated client-side** (uuid4; ComfyUI accepts caller-chosen ids) and
  the watch is registered *before* ``POST /prompt``, on a socket that is already open with
  the same ``clientId`` — ComfyUI routes lifecycle events only to the submitting client's
  socket, and a fast prompt can start before the POST returns, so nothing is lost.
* **Settling from history.** ComfyUI does not buffer messages for a disconnected socket.
  When the socket drops or stalls (no frame for ``stall_timeout`` while a watched prompt is
  unfinished), the reader reconnects with exponential backoff (same ``clientId``) and, for
  every unfinished prompt, asks ``/queue`` (still pending/running → keep following live)
  and ``/history/{id}`` (finished → outcome from ``status_str``; interrupted vs errored by
  the LAST ``status.messages`` entry; error payload from its ``execution_error``). Neither
  → `ComfyPromptLost` (ComfyUI restarted; retryable). No answer for longer than
  ``unreachable_deadline`` → `ComfyUnreachable` (retryable). So a dropped socket never turns
  a finished job into a failure or a hang. ``execution_success`` ends a stream at once; a
  bare ``executing {node: null}`` (success message missed) is settled from ``/history``.
  The ``executing {node}`` the server replays to a reconnecting socket carries no prompt id;
  it is attributed to the prompt ``/queue`` shows running.
* **Cancel never hits another prompt**: it interrupts only by ``POST /interrupt {"prompt_id"}``,
  which ComfyUI applies only while that prompt is the running one (never the body-less, global
  form), and deletes a pending prompt (``POST /queue {"delete"}``, confirmed by ``/queue`` and
  ``/history``). What the stream already knows saves round trips: a prompt seen starting is
  interrupted at once, one submitted and not seen starting is deleted before looking; an
  unknown prompt is looked up in ``/queue`` first.
* **Outputs without a second look**: ``outputs(prompt_id, listed=succeeded.outputs)`` downloads
  the files the ``executed`` messages named (ComfyUI re-sends them for cached output nodes), or
  those of the history entry the stream settled from; without ``listed`` it reads ``/history``.
* Every HTTP call has a (connect, read) timeout; errors map onto a small hierarchy
  (`ComfyError` with ``code``, ``retryable`` and ``to_dict()`` for the service's error body).
  Logging goes through the stdlib logger ``workers.comfy``.

Usage::

    with ComfyClient("http://127.0.0.1:8188") as comfy:
        sub = comfy.submit(graph)
        result = comfy.wait(sub.prompt_id, on_event=print, timeout=600)
        files = comfy.outputs(sub.prompt_id, listed=result.outputs)
"""
from workers.comfy.client import ComfyClient, output_refs
from workers.comfy.errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyPromptLost,
    ComfyProtocolError,
    ComfyTimeout,
    ComfyUnreachable,
    ComfyValidationError,
    ComfyWaitTimeout,
)
from workers.comfy.models import (
    TERMINAL_TYPES,
    Cached,
    CancelOutcome,
    Device,
    Event,
    Executed,
    Executing,
    Failed,
    HistoryEntry,
    Interrupted,
    LogEntry,
    NodeInfo,
    OutputFile,
    Preview,
    Progress,
    QueueItem,
    QueueState,
    RunResult,
    Started,
    Submission,
    Succeeded,
    SystemStats,
    TerminalEvent,
)

__all__ = [
    "ComfyClient", "output_refs",
    "ComfyError", "ComfyExecutionError", "ComfyInterrupted", "ComfyPromptLost", "ComfyProtocolError",
    "ComfyTimeout", "ComfyUnreachable", "ComfyValidationError", "ComfyWaitTimeout",
    "TERMINAL_TYPES", "Cached", "CancelOutcome", "Device", "Event", "Executed", "Executing", "Failed",
    "HistoryEntry", "Interrupted", "LogEntry", "NodeInfo", "OutputFile", "Preview", "Progress", "QueueItem",
    "QueueState", "RunResult", "Started", "Submission", "Succeeded", "SystemStats", "TerminalEvent",
]
