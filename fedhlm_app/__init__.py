"""FedHLM: federated hybrid language-model inference (arXiv 2507.00082) on Flower.

The package splits into a pure core (numpy, no Flower imports) and thin Flower
adapters:

- core: ``config``, ``data``, ``partition``, ``features``, ``head``,
  ``uncertainty``, ``threshold``, ``speculative``, ``oracle``, ``aggregation``,
  ``ledger``, ``report``;
- Flower adapters: ``records`` (numpy <-> Flower records), ``strategy``,
  ``client`` (ClientApp handlers) and ``server`` (ServerApp round loop).
"""

__version__ = "0.1.0"
