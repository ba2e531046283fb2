"""New-data events: announce that a dataset has new data, so that the `validate-data`
deployment's trigger (prefect.yaml) validates it (``oncoflow prefect data-arrived``)."""

from __future__ import annotations

import os

from components.workspace import Workspace
from flows.prefect_local import read_stack

DATA_ARRIVED_EVENT = "oncoflow.data.arrived"


def announce_data(
    overrides: list[str],
    api_url: str | None = None,
    workspace: str | os.PathLike | None = None,
) -> str:
    """Emit ``oncoflow.data.arrived`` for the dataset of `overrides`; returns the resource id.

    The validate-data deployment's trigger (prefect.yaml) runs validation with `overrides`.
    Call it from whatever lands new data (an upload job, a cron on the data directory). The
    API is `api_url`, else the stack `up` started in the workspace, else $PREFECT_API_URL.
    """
    import asyncio

    from prefect.events import Event

    from components.config import compose
    from components.errors import ConfigError

    stack = read_stack(Workspace.from_env(workspace)) or {}
    api_url = api_url or stack.get("api_url") or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConfigError("no Prefect API to announce to: pass --api-url or set PREFECT_API_URL")
    dataset = compose(list(overrides)).dataset.name
    resource = f"oncoflow.dataset.{dataset}"
    event = Event(
        event=DATA_ARRIVED_EVENT,
        resource={"prefect.resource.id": resource, "prefect.resource.name": dataset},
        payload={"overrides": list(overrides)},
    )
    asyncio.run(_emit(event, api_url))
    return resource


async def _emit(event, api_url: str) -> None:
    """Send one event now (not through the background worker, which may outlive us)."""
    from prefect.events.clients import PrefectEventsClient

    async with PrefectEventsClient(api_url=api_url) as client:
        await client.emit(event)
