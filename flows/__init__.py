"""Prefect flows and the `oncoflow` CLI: compose components into pipelines."""
