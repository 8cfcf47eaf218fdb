"""The comfy-service HTTP API (Flask): `create_app` in app/factory.py; the CLI and the Python
client (app/cli.py, app/client.py) live here too.

`create_app` is imported on first use, so `python -m app.cli` and `import app.client` load
neither Flask nor Celery.
"""


def __getattr__(name: str):
    if name == "create_app":
        from app.factory import create_app

        return create_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
