"""Tools for a real multi-machine deployment (docs/deployment.md).

- ``credentials``: a test CA, the SuperLink's TLS certificate and SuperNode key pairs;
- ``node_data``: split a dataset into one data folder per SuperNode (``data-path``);
- ``loopback``: a whole secured deployment on one machine (SuperLink, SuperNodes,
  TLS, node authentication), started and stopped by PID.
"""
