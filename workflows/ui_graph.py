"""UI-format graphs: what ComfyUI's editor saves, kept beside each API-format graph.

ComfyUI embeds the editor graph in every PNG it saves (`extra_pnginfo.workflow`), so an
image opens in ComfyUI with the graph that made it. The service sends the UI graph of the
workflow with the rendered widget values, so callers get the same.

`build_ui_graph` is a one-off generator (run `python -m workflows.ui_graph`) that lays the
committed `ui.json` out from `api.json` and the node schemas; `apply_widgets` is the pure
per-request step that copies the rendered API inputs into the UI graph's widget values.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Inputs that ComfyUI's editor follows with a "control after generate" widget.
SEED_INPUTS = {"seed", "noise_seed"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _input_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 0
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(src) for src in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def build_ui_graph(api: dict, schemas: dict) -> dict:
    depth = _depths(api)
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    links: list[list] = []
    nodes: dict[str, dict] = {}
    column_rows: dict[int, int] = {}
    for index, node_id in enumerate(order):
        node = api[node_id]
        schema = schemas[node["class_type"]]
        declared = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
        col = depth[node_id]
        row = column_rows.get(col, 0)
        column_rows[col] = row + 1
        entry = {
            "id": int(node_id), "type": node["class_type"], "pos": [40 + 340 * col, 60 + 360 * row],
            "size": [300, 120 + 26 * len(node["inputs"])], "flags": {}, "order": index, "mode": 0,
            "inputs": [], "outputs": [
                {"name": name, "type": kind, "links": [], "slot_index": slot}
                for slot, (name, kind) in enumerate(zip(schema["output_name"], schema["output"]))
            ],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": [],
        }
        for name, value in node["inputs"].items():
            kind = _input_type(declared[name])
            item = {"name": name, "type": kind, "link": None}
            if kind in WIDGET_TYPES:
                item["widget"] = {"name": name}
            if isinstance(value, list):
                link_id = len(links) + 1
                src_id, slot = value
                links.append([link_id, int(src_id), slot, int(node_id), len(entry["inputs"]), kind])
                item["link"] = link_id
                nodes[src_id]["outputs"][slot]["links"].append(link_id)
            entry["inputs"].append(item)
        nodes[node_id] = entry
    graph = {
        "last_node_id": max(int(n) for n in api), "last_link_id": len(links),
        "nodes": list(nodes.values()), "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4,
    }
    return apply_widgets(graph, api)


def apply_widgets(ui: dict, api: dict) -> dict:
    """Return `ui` with each node's widget values set to the API graph's literal inputs.

    Only the node dicts are new: everything else is shared with `ui`, which is never mutated
    (a deep copy per request cost a third of a submit's CPU in the benchmarks).
    """
    nodes = []
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        values = []
        for item in node["inputs"]:
            name = item.get("widget", {}).get("name")
            if name is None or isinstance(inputs.get(name), list):
                continue
            values.append(inputs[name])
            if name in SEED_INPUTS:
                values.append("fixed")
        nodes.append({**node, "widgets_values": values})
    return {**ui, "nodes": nodes}


# Schemas of the core nodes of the SDXL graph that the StoryDiffusion schema file lacks
# (types and output names only: that is all a UI graph records).
CORE_SCHEMAS = {
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING"], "clip": ["CLIP"]}},
                       "output": ["CONDITIONING"], "output_name": ["CONDITIONING"]},
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT"], "steps": ["INT"], "cfg": ["FLOAT"], "sampler_name": [[]],
        "scheduler": [[]], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
        "latent_image": ["LATENT"], "denoise": ["FLOAT"]}},
        "output": ["LATENT"], "output_name": ["LATENT"]},
}


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent
    schemas = json.loads((root.parent / "comfyui_sim" / "data" / "storydiffusion_object_info.json").read_text())
    schemas.update(CORE_SCHEMAS)
    for name in argv or [p.name for p in root.iterdir() if (p / "api.json").exists()]:
        api = json.loads((root / name / "api.json").read_text())
        (root / name / "ui.json").write_text(json.dumps(build_ui_graph(api, schemas), indent=2) + "\n")
        print(f"wrote {name}/ui.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
