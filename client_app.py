"""fedhlm: Flower ClientApp entry point (the handlers live in fedhlm_app.app.client_app)."""

from fedhlm_app.app.client_app import app

__all__ = ["app"]
