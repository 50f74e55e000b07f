"""The search service and its web page: ``waldo serve --index DIR``.

``create_app(index_dir, settings)`` builds the FastAPI app (see ``app.py``); the routes live in
``routers/``, the shared state in ``service.py`` and every limit in ``settings.py``. Importing
this package loads neither torch nor the index: the app's lifespan does, once, at start-up.
"""

from waldo.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    # Lazy, like ``waldo.Waldo``: the CLI parses arguments before anything heavy is imported.
    if name == "create_app":
        from waldo.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'waldo.serve' has no attribute {name!r}")
