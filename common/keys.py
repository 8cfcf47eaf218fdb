"""Every Redis key comfy-service uses, named in one place.

Nothing else builds a `cs:` string. Lua scripts get every key they touch through KEYS
(built here by the caller), never by string arithmetic inside the script, so a script's
keys are declared as Redis Cluster requires.
"""
from __future__ import annotations

PREFIX = "cs:"


# One job -----------------------------------------------------------------------------------
def task(task_id: str) -> str:
    """The task record: a hash of short JSON values (common/task_store.py)."""
    return f"{PREFIX}task:{task_id}"


def task_long(task_id: str) -> str:
    """The record's long values (params, result, error, ...), each compressed JSON: kept apart so
    the record's own hash stays a compact listpack (common/task_store.py)."""
    return f"{PREFIX}taskz:{task_id}"


def payload(task_id: str) -> str:
    """The rendered graphs the job runs (compressed JSON)."""
    return f"{PREFIX}payload:{task_id}"


def payload_dictionary(dict_id: int) -> str:
    """A workflow's template, the preset dictionary its jobs' graphs are compressed against
    (named by its zlib dictionary id, the Adler-32 that each compressed payload names)."""
    return f"{PREFIX}zdict:{dict_id:08x}"


def events(task_id: str) -> str:
    """The job's event log: a stream the event stream (SSE) and DELETE read. A waiting job has
    none until its next event (common/events.py)."""
    return f"{PREFIX}events:{task_id}"


def logs(task_id: str) -> str:
    """The job's log lines (ComfyUI's and the worker's): a list of JSON lines."""
    return f"{PREFIX}logs:{task_id}"


def idempotency(owner: str, digest: str) -> str:
    return f"{PREFIX}idem:{owner}:{digest}"


# One GPU queue: the jobs on it in each stage, and their total cost -----------------------------
def waiting(queue: str) -> str:
    """Sorted set of jobs waiting in Celery for this GPU (score: enqueue time, ms)."""
    return f"{PREFIX}queued:{queue}"


def handed(queue: str) -> str:
    """Sorted set of jobs this GPU's worker took and queued inside its ComfyUI (score: hand time)."""
    return f"{PREFIX}handed:{queue}"


def running(queue: str) -> str:
    """Set of jobs ComfyUI is executing on this GPU."""
    return f"{PREFIX}running:{queue}"


QUEUE_COUNTS = f"{PREFIX}queues"
"""Hash: GPU queue → its counters, four integers separated by spaces (`STAGES`): the jobs in its
waiting, handed and running indexes, and their total cost in thousandths of a cost unit. Kept by
the task store's scripts with the indexes, so one HGETALL reads the whole fleet's backlog however
many GPUs (dispatch never counts or sums per request), and a reader compares one value per queue
to see whether it changed."""
STAGES = ("waiting", "handed", "running", "load")


def counters_text(waiting: int, handed: int, running: int, load: int) -> str:
    """A QUEUE_COUNTS value (the scripts write the same form)."""
    return f"{waiting} {handed} {running} {load}"


def parse_counters(value) -> tuple[int, int, int, int]:
    """A QUEUE_COUNTS value → (waiting, handed, running, load); None → zeros."""
    if not value:
        return (0, 0, 0, 0)
    waiting, handed, running, load = map(int, value.split())
    return (waiting, handed, running, load)


def legacy_load(queue: str) -> str:
    """Where versions before QUEUE_COUNTS kept a queue's cost total (an integer): the monitor adopts
    what is left there into QUEUE_COUNTS, so a fleet upgraded with jobs in flight stays exact."""
    return f"{PREFIX}loadsum:{queue}"


def queue_keys(queue: str) -> list[str]:
    """A queue's index keys in the order the task store's scripts take them."""
    return [waiting(queue), handed(queue), running(queue)]


# The fleet ------------------------------------------------------------------------------------
WORKERS = f"{PREFIX}workers"  # sorted set: GPU queue → last heartbeat time
HEARTBEATS = f"{PREFIX}workers:beats"  # hash: GPU queue → its last heartbeat (JSON, with its time `ts`)
HEARTBEAT_TIMES = f"{PREFIX}workers:beat_times"  # hash: GPU queue → that heartbeat's time (what readers poll)
KNOWN_WORKERS = f"{PREFIX}workers:known"  # hash: GPU queue → its last heartbeat's labels (JSON), kept


MONITOR_LOCK = f"{PREFIX}monitor:lock"
# Autoscaling (common/fleet.py): when each live GPU was first seen with no job, and what the
# fleet last measured (cold start, speed), kept for when it has scaled to zero.
FLEET_IDLE_SINCE = f"{PREFIX}fleet:idle_since"  # hash: GPU queue → unix time
FLEET_LEARNED = f"{PREFIX}fleet:learned"  # hash: cold_start_seconds, seconds_per_unit
CELERY_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages (its default name)
CELERY_UNACKED_INDEX = "unacked_index"  # kombu's sorted set: delivery tag → when it was delivered


def celery_queue(queue: str) -> str:
    """kombu's list of a GPU queue's Celery messages: the queue's own name (priority 0; no prefix)."""
    return queue


REPLICATION_MARK = f"{PREFIX}replication:mark"  # written before WAIT (REDIS_MIN_REPLICAS)
DISPATCH_TURN = f"{PREFIX}dispatch:turn"  # the round-robin baseline's counter (DISPATCH_POLICY)

# Admission and cancel ------------------------------------------------------------------------
ACTIVE = f"{PREFIX}active"  # set: every unfinished job (MAX_ACTIVE_JOBS)


def active(owner: str | None = None) -> str:
    """Unfinished jobs of one owner (MAX_ACTIVE_JOBS_PER_KEY), or of the whole service."""
    return f"{ACTIVE}:{owner}" if owner else ACTIVE


def pruned(set_key: str) -> str:
    """Marks a recent prune of an active set (at most every few seconds)."""
    return f"{set_key}:pruned"


CANCEL_CHANNEL = f"{PREFIX}cancel"  # pub/sub: task ids whose cancel was requested

# Webhooks, metrics, keys, limits ----------------------------------------------------------------
WEBHOOKS_PENDING = f"{PREFIX}webhooks:pending"  # finished jobs whose final webhook is not settled
METRIC_COUNTERS = f"{PREFIX}metrics:counters"
METRIC_LAST_SUCCESS = f"{PREFIX}metrics:last_success"


def metric_histogram(name: str) -> str:
    return f"{PREFIX}metrics:hist:{name}"


API_KEYS = f"{PREFIX}apikeys"
API_KEY_NAMES = f"{PREFIX}apikeys:names"
RATE_LIMIT_PREFIX = f"{PREFIX}ratelimit"
