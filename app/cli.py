"""comfy-service from the command line: submit a job, watch it, fetch its images.

    python -m app.cli generate --character "Lena=a young woman with red hair" \\
        --scene "[Lena] wakes up in a small flat" --scene "[Lena] walks along the sea" --seed 42
    python -m app.cli generate --workflow sdxl --prompt "a lighthouse at dusk" --json
    python -m app.cli status TASK_ID [--json]
    python -m app.cli cancel TASK_ID
    python -m app.cli workers
    python -m app.cli fleet
    python -m app.cli workflows

`--url` (env COMFY_SERVICE_URL, default http://127.0.0.1:8080) and `--api-key` (env
COMFY_SERVICE_API_KEY) go before the command. Results go to stdout (image paths, or JSON with
--json); progress and messages go to stderr.

Exit codes, for scripts:
  0    success: the job succeeded, or the command was done
  1    the job failed
  2    usage error (bad options)
  3    the job was cancelled
  4    the service rejected the request (a 4xx error document; printed as source/code: message)
  5    the service is unavailable (no connection, timeout, 5xx)
  130  interrupted (Ctrl-C); `generate` leaves the job running unless --cancel-on-interrupt
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from app.client import (DEFAULT_URL, ApiError, ComfyServiceClient, ComfyServiceError, Event, ServiceUnreachable,
                        Task, TaskError, Worker, WorkflowInfo)

OK, JOB_FAILED, USAGE, JOB_CANCELLED, REJECTED, UNAVAILABLE, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
# The --help epilog is the docstring's table: one text to keep right (empty under python -OO).
EXIT_CODES = "Exit codes, for scripts:" + (__doc__ or "").partition("Exit codes, for scripts:")[2].rstrip()
OUTCOME_CODES = {"succeeded": OK, "failed": JOB_FAILED, "cancelled": JOB_CANCELLED}
# How the user started us, for the hints we print (`make install` also installs `comfy-service`).
PROG = "comfy-service" if os.path.basename(sys.argv[0]) == "comfy-service" else "python -m app.cli"


class UsageError(Exception):
    """A bad option value found after parsing (argparse reports it, exit 2)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def report_error(source: str, code: str, message: str) -> None:
    say(f"error: {source}/{code}: {message}")


# -- generate: the body ---------------------------------------------------------------------------

def _pair(text: str, option: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{option} takes {form}, got {text!r}")
    return key.strip(), value


def _json_value(text: str) -> Any:
    """--set values are JSON when they parse (numbers, lists, true), else plain strings."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_body(source: str) -> dict:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        body = json.loads(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--body {source}: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"--body {source}: must hold a JSON object")
    return body


def _workflow_info(client: ComfyServiceClient, name: str | None) -> WorkflowInfo | None:
    for info in client.workflows():
        if info.name == name or (name is None and info.default):
            return info
    return None  # an unknown workflow: the service says so when the job is submitted


def _prompt_fields(client: ComfyServiceClient, workflow: str | None, texts: list[str]) -> dict:
    """--prompt/--scene texts go where the workflow takes them: a list of scenes, or one prompt.
    The workflow's schema decides, so a new workflow needs no CLI change."""
    info = _workflow_info(client, workflow)
    properties = info.properties if info else {}
    if "scenes" in properties:
        return {"scenes": texts}
    if len(texts) > 1:
        raise UsageError(f"workflow {workflow or 'default'} takes one --prompt, got {len(texts)}")
    return {"prompt": texts[0]}


def build_body(args: argparse.Namespace, client: ComfyServiceClient) -> dict:
    """The request body: --body first, then each option over it, then --set over everything."""
    body = _read_body(args.body) if args.body else {}
    if args.workflow:
        body["workflow"] = args.workflow
    if args.character:
        body["characters"] = [dict(zip(("name", "description"), _pair(c, "--character", "NAME=DESCRIPTION")))
                              for c in args.character]
    if args.texts:
        body.update(_prompt_fields(client, body.get("workflow"), args.texts))
    for option in ("negative_prompt", "width", "height", "seed", "steps", "gpu", "host", "callback_url"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    if args.callback_event:
        body["callback_events"] = args.callback_event
    for item in args.set:
        key, value = _pair(item, "--set")
        body[key] = _json_value(value)
    return body


# -- generate: watching ---------------------------------------------------------------------------

class ProgressBar:
    """A tqdm bar on stderr fed by the task's events: queue position while it waits, then percent
    with the node and step ComfyUI is on."""

    def __init__(self, task: Task, enabled: bool):
        # Drawn on a terminal only: in a log file every redraw would be a line of its own.
        self.bar = tqdm(total=100, disable=not enabled or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        self.images, self.shown_position = 0, False
        self._queued(task.queue_position)

    def _queued(self, position: int | None) -> None:
        if position is None and self.shown_position:
            return  # not known any more (it is about to start): keep the last one shown
        self.shown_position = position is not None
        self.bar.set_description_str("queued" if position is None else f"queued #{position}")

    def __call__(self, event: Event) -> None:
        data = event.data
        if event.type == "queued":
            self._queued(data.get("queue_position"))
        elif event.type == "started":
            self.bar.set_description_str(f"running on {data.get('gpu') or '?'}")
        elif event.type == "progress":
            self.bar.n = min(100.0, float(data.get("percent") or 0.0))
            if data.get("node") is not None:  # None: ComfyUI has not named a node yet
                self.bar.set_postfix_str(f"node {data['node']} step {data.get('step')}/{data.get('max')}")
        elif event.type == "output":
            self.images += 1
            self.bar.set_postfix_str(f"{self.images} image(s) stored")
        elif event.final:
            self.bar.set_description_str(event.type)
            if event.type == "succeeded":
                self.bar.n = 100
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _interrupted(client: ComfyServiceClient, task_id: str, cancel: bool) -> int:
    if not cancel:
        say(f"interrupted: task {task_id} goes on. Follow it with: {PROG} status {task_id}")
        return INTERRUPTED
    try:
        task = client.cancel(task_id)
        say(f"interrupted: task {task_id} {'cancelled' if task.done else 'is being cancelled'}")
    except ComfyServiceError as exc:
        say(f"interrupted: could not cancel task {task_id} ({exc}); check it with: {PROG} status {task_id}")
    return INTERRUPTED


def _finish(client: ComfyServiceClient, task: Task, args: argparse.Namespace) -> int:
    """Outcome → downloads, output and exit code."""
    files: list[Path] = []
    if task.status == "succeeded" and not args.no_download:
        files = client.download(task, args.out or Path("outputs") / task.task_id)
    if args.json:
        print_json({**task.model_dump(mode="json"), "downloaded": [str(p) for p in files]})
    else:
        for path in files:
            print(path)
    if task.status == "failed":
        error = task.error or TaskError(source="service", code="failed", message="the job failed")
        report_error(error.source, error.code, error.message)
    elif task.status == "cancelled":
        say(f"task {task.task_id} was cancelled")
    elif not args.quiet:
        say(f"task {task.task_id} succeeded: {len(task.images)} image(s)"
            + (f" in {files[0].parent}" if files else ""))
    return OUTCOME_CODES.get(task.status, JOB_FAILED)


def _watch(client: ComfyServiceClient, task: Task, args: argparse.Namespace) -> Task:
    if not args.quiet:
        say(f"task {task.task_id} queued ({task.workflow}); follow it elsewhere with: {PROG} status {task.task_id}")
    bar = ProgressBar(task, enabled=not args.quiet)
    try:
        return client.wait(task.task_id, on_event=bar)
    finally:
        bar.close()


def cmd_generate(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    task = client.generate(build_body(args, client), idempotency_key=args.idempotency_key)
    if args.no_wait:
        if args.json:
            print_json(task.model_dump(mode="json"))
        else:
            print(task.task_id)
        return OK
    try:  # from the moment the job exists: a Ctrl-C at any point says how to find it again
        final = _watch(client, task, args)
    except KeyboardInterrupt:
        return _interrupted(client, task.task_id, args.cancel_on_interrupt)
    return _finish(client, final, args)


# -- The other commands -------------------------------------------------------------------------------

def _when(value) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def describe(task: Task) -> list[tuple[str, str]]:
    """A task as label/value rows for people."""
    state = task.status
    if task.status == "queued" and task.queue_position is not None:
        state += f" (position {task.queue_position})"
    elif task.status == "running" and task.progress:
        p = task.progress
        state += f" {p.percent:.0f}%" + (f" (node {p.node}, step {p.step}/{p.max})" if p.node else "")
    if task.cancel_requested and not task.done:
        state += ", cancel requested"
    rows = [("task", task.task_id), ("status", state), ("workflow", task.workflow or "-"), ("gpu", task.gpu or "-"),
            ("seed", str(task.params.get("seed", "-"))), ("created", _when(task.created_at)),
            ("started", _when(task.started_at)), ("finished", _when(task.finished_at))]
    rows += [(f"image {i}", f"{image.url} ({image.width}x{image.height}, {image.size} bytes)")
             for i, image in enumerate(task.images)]
    if task.error:
        rows.append(("error", f"{task.error.source}/{task.error.code}: {task.error.message}"))
    return rows


def cmd_status(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    task = client.get(args.task_id)
    if args.json:
        print_json(task.model_dump(mode="json"))
    else:
        width = max(len(label) for label, _ in describe(task))
        for label, value in describe(task):
            print(f"{label:<{width}}  {value}")
    return OK


def cmd_cancel(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    task = client.cancel(args.task_id)
    if args.json:
        print_json(task.model_dump(mode="json"))
    else:
        print(f"task {task.task_id} " + ("cancelled" if task.status == "cancelled" else
                                         f"{task.status}: ComfyUI is stopping it; it ends cancelled shortly"))
    return OK


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _gib(mb: float | None) -> str:
    return "?" if mb is None else f"{mb / 1024:.1f}"


def worker_row(w: Worker) -> list[str]:
    gpu = w.gpu
    memory = "-" if gpu.memory_total_mb is None else f"{_gib(gpu.memory_used_mb)}/{_gib(gpu.memory_total_mb)} GiB"
    util = "-" if gpu.utilization is None else f"{gpu.utilization:.0f}%"
    return [w.queue, w.host or "-", gpu.name or "-", memory, util, str(w.waiting), str(len(w.running)),
            f"{w.load:.1f}", "ok" if w.comfyui_ok else "DOWN", "yes" if w.draining else "no"]


def cmd_workers(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    workers = client.workers()
    if args.json:
        print_json([w.model_dump(mode="json") for w in workers])
    elif not workers:
        say("no live GPU worker")
    else:
        print(table(["QUEUE", "HOST", "GPU", "MEMORY", "UTIL", "WAITING", "RUNNING", "LOAD", "COMFYUI", "DRAINING"],
                    [worker_row(w) for w in workers]))
    return OK


def cmd_fleet(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    fleet = client.fleet()
    if args.json:
        print_json(fleet.model_dump(mode="json"))
        return OK
    print(f"GPUs: {fleet.current} now, {fleet.desired} desired ({fleet.action}): {fleet.reason}")
    if fleet.retire_first:
        print(f"retire first: {fleet.retire_first}")
    if fleet.gpus:
        print(table(["QUEUE", "STATE", "WORK S", "IDLE S", "S/UNIT", "CHECKPOINT"],
                    [[g.queue, g.state, f"{g.work_seconds:.0f}", f"{g.idle_seconds:.0f}",
                      "-" if g.seconds_per_unit is None else f"{g.seconds_per_unit:.3f}", g.checkpoint or "-"]
                     for g in fleet.gpus]))
    return OK


def param_summary(name: str, schema: dict, required: bool) -> str:
    """One line per parameter: type, bounds, default (the full JSON Schema is in --json)."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    spec = options[0] if options else schema
    kind = spec.get("type", "object" if "$ref" in spec else "any")
    facts = []
    if "enum" in spec:
        values = spec["enum"]
        facts.append("one of " + (", ".join(map(str, values)) if len(values) <= 4 else f"{len(values)} values"))
    if "minimum" in spec or "maximum" in spec:
        facts.append(f"{spec.get('minimum', '')}..{spec.get('maximum', '')}")
    if "minItems" in spec or "maxItems" in spec:
        facts.append(f"{spec.get('minItems', 0)}..{spec.get('maxItems', '')} items")
    if required:
        facts.append("required")
    elif "default" in schema and len(json.dumps(schema["default"])) <= 60:
        facts.append(f"default {json.dumps(schema['default'])}")
    return f"  {name:<16} {kind:<8} {'; '.join(facts)}".rstrip()


def cmd_workflows(client: ComfyServiceClient, args: argparse.Namespace) -> int:
    workflows = client.workflows()
    if args.json:
        print_json([w.model_dump(mode="json") for w in workflows])
        return OK
    for number, info in enumerate(workflows):
        print(("\n" if number else "") + f"{info.name}{' (default)' if info.default else ''}: {info.title}")
        for name, schema in info.properties.items():
            print(param_summary(name, schema, name in info.required))
    return OK


# -- Parser and entry point -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Drive comfy-service: generate, status, cancel, "
                                     "workers, workflows.", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("COMFY_SERVICE_URL", DEFAULT_URL),
                        help="the service (env COMFY_SERVICE_URL; default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("COMFY_SERVICE_API_KEY"),
                        help="Bearer key (env COMFY_SERVICE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        sub.add_argument("--json", action="store_true", help="print JSON on stdout")
        return sub

    gen = command("generate", cmd_generate, "submit a job, show its progress, download its images")
    body = gen.add_argument_group("the job")
    body.add_argument("--workflow", help="workflow name (default: the service's default)")
    body.add_argument("--prompt", "--scene", dest="texts", action="append", default=[], metavar="TEXT",
                      help="the prompt; for workflows with scenes, one scene per use (repeat)")
    body.add_argument("--character", action="append", default=[], metavar="NAME=DESCRIPTION",
                      help="a character (repeat)")
    body.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help="negative prompt")
    for option in ("width", "height", "seed", "steps"):
        body.add_argument(f"--{option}", type=int)
    body.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any other parameter; VALUE is JSON when it parses, else a string (repeat)")
    body.add_argument("--body", metavar="FILE|-", help="a whole JSON body (options override its fields)")
    service = gen.add_argument_group("placement and delivery")
    service.add_argument("--gpu", help="pin to one GPU queue (gpu.<host>.<index>)")
    service.add_argument("--host", help="pin to one host's GPUs")
    service.add_argument("--idempotency-key", help="a retry with the same key and body queues nothing twice")
    service.add_argument("--callback-url", help="webhook URL for status changes")
    service.add_argument("--callback-event", action="append", default=[], metavar="EVENT",
                         help="webhook only for these events (repeat)")
    output = gen.add_argument_group("output")
    output.add_argument("--out", type=Path, metavar="DIR", help="where images go (default ./outputs/<task id>/)")
    output.add_argument("--no-wait", action="store_true", help="print the task id (or document) and exit")
    output.add_argument("--no-download", action="store_true", help="do not fetch the images")
    output.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages on stderr")
    output.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job too")

    for name, func, help in (("status", cmd_status, "show a task"), ("cancel", cmd_cancel, "cancel a task")):
        command(name, func, help).add_argument("task_id", metavar="TASK_ID")
    command("workers", cmd_workers, "the live GPU workers")
    command("fleet", cmd_fleet, "the fleet's size, the size it should have, and why")
    command("workflows", cmd_workflows, "the workflows and their parameters")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = ComfyServiceClient(args.url, args.api_key, timeout=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return args.func(client, args)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except ApiError as exc:
        report_error(exc.source, exc.code, exc.message)
        errors = exc.details.get("errors") if isinstance(exc.details, dict) else None
        if isinstance(errors, list) and len(errors) > 1:  # the message names the first one only
            for item in errors[:20]:
                say(f"  {item.get('field')}: {item.get('message')}" if isinstance(item, dict) else f"  {item}")
        return UNAVAILABLE if exc.status >= 500 else REJECTED
    except ServiceUnreachable as exc:
        report_error(exc.source, exc.code, exc.message)
        return UNAVAILABLE
    except KeyboardInterrupt:
        say("interrupted")
        return INTERRUPTED
    except BrokenPipeError:
        # stdout went away (`… | head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
