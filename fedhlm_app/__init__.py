"""FedHLM: federated hybrid language-model inference (arXiv 2507.00082) on Flower.

The packages, one concern each (docs/guide.md's Layout section lists every module):

- ``slm``, ``routing``, ``fl``, ``data``, ``reporting``: the numerical core (numpy; torch only in
  ``slm.features`` and ``slm.finetune``), unit-tested directly;
- ``oracle``: the cloud LLM behind one interface, its backends and its HTTP service;
- ``app``: the Flower adapters (ClientApp handlers, ServerApp phases, the message protocol);
- ``tools``: the launcher, the in-process driver, the evaluation harness, deployment tools;
- ``config`` (the typed run config) and ``paths`` (where data, cache and results live).
"""

__version__ = "0.1.0"
