"""Federated training with Flower (Message API, flwr 1.41): sites, strategies, engines.

Modules (import from them; this package stays import-light):

- `settings`    `validate_federation(cfg) -> FederationSettings` (fails fast, ConfigError)
- `partition`   `partition(...)`, `partition_splits(...)`, `site_report(...)`
- `layout`      `prepare_federation(...)`: one directory per site + server test split + spec
- `engines`     `run_federated(...) -> FederatedResult` (simulation | deployment | inline)
- `server_app`  the ServerApp and the round driver (hygiene, checkpoints, evaluation)
- `client_app`  the ClientApp: local training with `fit_local`, evaluation, best local model
- `deployment`  SuperLink / SuperNode commands, `submit_run`, `LocalDeployment`
- `certs`       TLS certificates and SuperNode authentication keys
- `cli`         plain functions behind `oncoflow fl certs|prepare|superlink|supernode|submit`
"""
