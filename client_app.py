"""fedhlm: Flower ClientApp entry point (the handlers live in fedhlm_app.client)."""

from fedhlm_app.client import app

__all__ = ["app"]
