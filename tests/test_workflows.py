"""Workflow rendering and parameter validation: pure, no I/O."""
import random

import pytest
from pydantic import ValidationError

from workflows.catalog import load_catalog
from workflows.render import render, resolve_seed

CATALOG = load_catalog()
STORY = CATALOG["storydiffusion"]
SDXL = CATALOG["sdxl"]
LENA = {"name": "Lena", "description": "a young woman with red hair"}


def story(**fields):
    return {"characters": [LENA], "scenes": ["[Lena] wakes up in a small flat", "[Lena] walks to the sea"], **fields}


def errors_of(workflow, body):
    with pytest.raises(ValidationError) as info:
        workflow.parse(body)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in info.value.errors()}


def test_catalog_lists_both_workflows_with_json_schema():
    assert set(CATALOG) == {"storydiffusion", "sdxl"}
    schema = STORY.json_schema()
    assert schema["properties"]["width"]["multipleOf"] == 16
    assert schema["properties"]["style"]["enum"][0] == "No_style"
    assert schema["additionalProperties"] is False
    assert SDXL.json_schema()["required"] == ["prompt"]


def test_storydiffusion_fields_land_on_the_documented_node_inputs():
    params = resolve_seed(STORY.parse(story(style="Comic_book", width=1024, height=512, steps=12, cfg=6.5,
                                            sampler="dpmpp_2m", consistency=0.3, seed=42)))
    rendered = render(STORY, params, output_prefix="task-1")
    encode, sampler = rendered.api["78"]["inputs"], rendered.api["352"]["inputs"]
    assert encode["role_text"] == "[Lena] a young woman with red hair"
    assert encode["scene_text"] == "[Lena] wakes up in a small flat\n[Lena] walks to the sea"
    assert (encode["add_style"], encode["width"], encode["height"]) == ("Comic_book", 1024, 512)
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (42, 12, 6.5, "dpmpp_2m")
    assert sampler["sa32_degree"] == sampler["sa64_degree"] == 0.3
    assert rendered.api["85"]["inputs"]["filename_prefix"] == "task-1"
    assert rendered.api["81"]["inputs"]["width"] == ["78", 3]  # still linked, as the plugin expects
    assert rendered.expected_images == 2
    assert rendered.params["seed"] == 42


def test_render_does_not_touch_the_catalog_graph():
    before = STORY.api["352"]["inputs"]["seed"]
    render(STORY, resolve_seed(STORY.parse(story(seed=7))), "p")
    assert STORY.api["352"]["inputs"]["seed"] == before


def test_omitted_seed_is_drawn_and_reported():
    params = resolve_seed(STORY.parse(story()), random.Random(3))
    assert 0 <= params.seed <= 2**31 - 1
    assert render(STORY, params, "p").params["seed"] == params.seed


def test_ui_graph_carries_the_rendered_widget_values():
    rendered = render(SDXL, resolve_seed(SDXL.parse({"prompt": "a lighthouse at dusk", "seed": 5})), "p")
    nodes = {n["id"]: n for n in rendered.ui["nodes"]}
    assert nodes[6]["widgets_values"] == ["a lighthouse at dusk"]
    assert nodes[3]["widgets_values"][:2] == [5, "fixed"]  # seed, then the editor's control widget
    assert len(rendered.ui["links"]) == rendered.ui["last_link_id"]


@pytest.mark.parametrize("fields, field, fragment", [
    ({"scenes": ["[Bob] runs"]}, "scenes", "[Bob] is not one of the characters"),
    ({"scenes": ["no marker here"]}, "scenes", "name a character"),
    ({"scenes": ["[NC] an empty street", "[Lena] x y"]}, "scenes", "first scene"),
    ({"scenes": ["[Lena] and [Lena] again"]}, "scenes", "one character per scene"),
    ({"characters": [LENA, {"name": "Max", "description": "a tall man"}]}, "scenes", "appear in no scene"),
    ({"characters": [LENA, LENA]}, "characters", "unique"),
    ({"characters": []}, "characters", "at least 1"),
    ({"scenes": ["[Lena] line one\n[Lena] line two"]}, "scenes.0", "pattern"),
    ({"width": 1000}, "width", "multiple of 16"),
    ({"height": 4096}, "height", "less than or equal to 2048"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": 2**31}, "seed", "less than or equal to 2147483647"),
    ({"cfg": float("nan")}, "cfg", "finite"),
    ({"steps": "20"}, "steps", "valid integer"),
    ({"style": "Vaporwave"}, "style", "Input should be"),
    ({"checkpoint": "../../etc/passwd.safetensors"}, "checkpoint", "pattern"),
    ({"checkpoint": "sdxl/../../x.safetensors"}, "checkpoint", "checkpoints folder"),
    ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
])
def test_storydiffusion_rejects_bad_fields_by_name(fields, field, fragment):
    errors = errors_of(STORY, story(**fields))
    assert field in errors, errors
    assert fragment in errors[field]


def test_an_integer_written_as_a_float_is_an_integer():
    # The document's `integer` accepts 25.0 (JSON Schema), so the service does too; 25.5 and "25" stay errors.
    params = SDXL.parse({"prompt": "a lighthouse", "steps": 25.0, "width": 512.0, "cfg": 7.0})
    assert (params.steps, params.width, params.cfg) == (25, 512, 7.0) and type(params.steps) is int
    assert "steps" in errors_of(SDXL, {"prompt": "a lighthouse", "steps": 25.5})
    assert "steps" in errors_of(SDXL, {"prompt": "a lighthouse", "steps": "25"})


def test_sdxl_requires_a_prompt():
    assert "prompt" in errors_of(SDXL, {})
