"""Cloud LLM backends for the oracle (``fedhlm_app.oracle``), the oracle service and its wire format."""
