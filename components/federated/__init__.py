"""Federated training with Flower (Message API, flwr 1.41): sites, strategies, engines.

Modules (import from them; this package stays import-light):

- `settings`    `validate_federation(cfg) -> FederationSettings` (fails fast, ConfigError)
- `partition`   `partition(...)`, `partition_splits(...)`, `site_report(...)`
- `layout`      `prepare_federation(...)`: one directory per site + server test split + spec
- `engines`     `run_federated(...) -> FederatedResult` (simulation | deployment | inline)
- `server_app`  the ServerApp and the round driver (hygiene, checkpoints, evaluation)
- `client_app`  the ClientApp: local training with `fit_local`, evaluation, best local model
- `protocol`    what both apps share: record names, site ids, accepted rows, `exchange`
- `secagg_server` / `secagg_client`  the server's and the site's half of SecAgg+
- `deployment`  SuperLink / SuperNode commands, `submit_run`, and what
                `oncoflow fl certs|superlink|supernode|submit` run (flows/fl_commands.py parses)
- `local_deployment`  `LocalDeployment`: a SuperLink + SuperNodes as child processes here
- `certs`       TLS certificates and SuperNode authentication keys
"""
