"""fedhlm: Flower ServerApp entry point (the round loop lives in fedhlm_app.app.server_app)."""

from fedhlm_app.app.server_app import app

__all__ = ["app"]
