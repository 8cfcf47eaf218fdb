"""GET /api/v1/fleet: how many GPUs the fleet has, how many it should have, and why.

The same decision feeds the `comfy_fleet_desired_gpus` gauge (app/metrics.py) that KEDA scales
the GPU StatefulSet on (deploy/k8s/), and the local autoscaler; the rule is in common/scaling.py.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from common.fleet import assess, document

blueprint = Blueprint("fleet", __name__)


@blueprint.get("/fleet")
def get_fleet():
    svc = current_app.extensions["comfy"]
    return jsonify(document(assess(svc.redis, svc.registry, svc.settings)))
