"""The workflows the service offers: each folder holds api.json, ui.json and its parameters."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from workflows.common import WorkflowParams

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workflow:
    name: str
    title: str
    description: str
    params_model: type[WorkflowParams]
    api: dict
    ui: dict
    bind: Callable[[Any, str], dict[tuple[str, str], object]]
    expected_images: Callable[[Any], int]
    cost: Callable[[Any], float]
    progress_repeats: Callable[[Any], dict[str, int]]

    def parse(self, fields: dict) -> WorkflowParams:
        """Validate the request's fields; raises pydantic.ValidationError naming each bad field."""
        return self.params_model.model_validate(fields)

    def json_schema(self) -> dict:
        return self.params_model.model_json_schema()


def _load(name: str) -> Workflow:
    package = importlib.import_module(f"workflows.{name}")
    params = importlib.import_module(f"workflows.{name}.params")
    folder = ROOT / name
    return Workflow(
        name=name, title=package.TITLE, description=package.DESCRIPTION, params_model=params.Params,
        api=json.loads((folder / "api.json").read_text()), ui=json.loads((folder / "ui.json").read_text()),
        bind=params.bindings, expected_images=params.expected_images, cost=params.cost,
        progress_repeats=params.progress_repeats,
    )


@cache
def load_catalog() -> dict[str, Workflow]:
    names = sorted(p.name for p in ROOT.iterdir() if (p / "api.json").is_file() and (p / "params.py").is_file())
    return {name: _load(name) for name in names}
