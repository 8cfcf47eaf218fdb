"""The Flask application factory: settings, services, error handlers, security, routes."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError

from app import errors, security
from app.errors import error_response
from app.fleet import blueprint as fleet_blueprint
from app.metrics import blueprint as metrics_blueprint
from app.openapi import openapi_document
from app.proxies import ProxyMiddleware, TrustedProxies
from app.routes import api, probes
from app.services import Services
from app.sse import blueprint as events_blueprint
from app.task_logs import blueprint as task_logs_blueprint
from common.logs import setup_logging
from common.settings import Settings, get_settings

log = logging.getLogger("comfy.api")


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or get_settings()
    setup_logging("api", settings)  # idempotent: apps created again in one process add no sinks
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["comfy"] = services or Services.build(settings)
    errors.install(app)
    security.install(app, settings, app.extensions["comfy"].redis)  # keys, rate limits, CORS

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def _broker_down(exc):
        log.error("broker unavailable: %s", exc)
        response = error_response(503, "broker_unavailable", "the job broker (Redis) is unavailable; retry later",
                                  {"reason": type(exc).__name__})
        response.headers["Retry-After"] = "5"
        return response

    app.register_blueprint(api, url_prefix="/api/v1")
    app.register_blueprint(task_logs_blueprint, url_prefix="/api/v1")
    app.register_blueprint(events_blueprint, url_prefix="/api/v1")
    app.register_blueprint(fleet_blueprint, url_prefix="/api/v1")
    app.register_blueprint(probes)
    app.register_blueprint(metrics_blueprint)
    proxies = TrustedProxies(settings.trusted_proxies)
    if proxies:  # the caller's address behind nginx, for rate limits and logs (app/proxies.py)
        app.wsgi_app = ProxyMiddleware(app.wsgi_app, proxies)
    document = openapi_document(app.extensions["comfy"].catalog)

    @app.get("/openapi.json")
    def openapi():
        return jsonify(document)

    return app
