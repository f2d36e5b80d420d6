"""Commands around the app (not needed by Flower): the launcher, the in-process driver, the harness, deployment tools."""
