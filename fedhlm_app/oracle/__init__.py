"""Cloud LLM backends for the oracle (``fedhlm_app.oracle.base``), the oracle service and its wire format."""
