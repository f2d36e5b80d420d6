"""fedhlm: Flower ServerApp entry point (the round loop lives in fedhlm_app.server)."""

from fedhlm_app.server import app

__all__ = ["app"]
