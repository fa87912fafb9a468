"""``sdrt serve``: an AUTOMATIC1111-compatible HTTP API (``/sdapi/v1``) over sdrt exports.

FastAPI + uvicorn (``pip install sdrt[server]``); imported only by ``sdrt serve`` and by users who embed
the app (``create_app``).
"""
from __future__ import annotations

from .app import ServerOptions, create_app
from .convert import Limits

__all__ = ["Limits", "ServerOptions", "create_app", "serve"]


def serve(options: ServerOptions) -> None:
    """Run the server until interrupted (Ctrl-C)."""
    import uvicorn
    uvicorn.run(create_app(options), host=options.host, port=options.port, log_level="info")
