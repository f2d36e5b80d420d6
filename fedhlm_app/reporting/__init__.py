"""Measuring a run: the communication ledger, results files, evaluation metrics and the SLM frontier."""
