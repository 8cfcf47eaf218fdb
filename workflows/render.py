"""Rendering a workflow for one job: pure, so it tests without ComfyUI, Redis or Celery."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from workflows.catalog import Workflow
from workflows.common import SEED_MAX, WorkflowParams
from workflows.ui_graph import apply_widgets


@dataclass(frozen=True)
class Rendered:
    workflow: str
    params: dict  # every parameter as used, the seed included
    api: dict  # the API-format graph for POST /prompt
    ui: dict  # the editor graph for extra_pnginfo.workflow
    expected_images: int
    cost: float  # work units (sampler steps of a 1024² image) for dispatch
    checkpoint: str | None
    progress_repeats: dict  # node id → how often it runs its steps (progress restarts each time)


def resolve_seed(params: WorkflowParams, rng: random.Random | None = None) -> WorkflowParams:
    """Fill in a random seed when the caller gave none (it is reported back with the task)."""
    if params.seed is not None:
        return params
    return params.with_seed((rng or random.SystemRandom()).randint(0, SEED_MAX))


def render(workflow: Workflow, params: WorkflowParams, output_prefix: str) -> Rendered:
    if params.seed is None:
        raise ValueError("resolve the seed before rendering")
    # New node and inputs dicts only; link lists stay shared (they are never changed).
    api = {node_id: {**node, "inputs": dict(node["inputs"])} for node_id, node in workflow.api.items()}
    for (node_id, input_name), value in workflow.bind(params, output_prefix).items():
        inputs = api[node_id]["inputs"]
        if input_name not in inputs:  # a binding that misses the graph is a bug in the workflow folder
            raise KeyError(f"workflow {workflow.name}: node {node_id} has no input {input_name!r}")
        inputs[input_name] = value
    return Rendered(
        workflow=workflow.name, params=params.model_dump(mode="json"), api=api,
        ui=apply_widgets(workflow.ui, api), expected_images=workflow.expected_images(params),
        cost=round(workflow.cost(params), 6), checkpoint=getattr(params, "checkpoint", None),
        progress_repeats=workflow.progress_repeats(params),
    )


def payload_dictionary(workflow: Workflow) -> bytes:
    """What a job's graphs are compressed against (a zlib preset dictionary): its workflow's
    templates, of which the graphs are a copy with the job's values bound in. A tenth of the
    bytes of compressing them alone; the same bytes for as long as the templates do not change."""
    return json.dumps({"graph": workflow.api, "ui": workflow.ui}, separators=(",", ":")).encode()
