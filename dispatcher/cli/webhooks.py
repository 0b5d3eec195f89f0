"""``letta-bus webhooks set|get|rm|test|rotate-secret|list``: an agent's webhook, through the management API.

``set`` and ``rotate-secret`` fall back to writing the database directly when no API answers (``letta-bus up``
not running, or run with ``LETTA_BUS_API_PORT=0``); running dispatchers then see the change at their next
periodic refresh (``LETTA_BUS_ENDPOINT_REFRESH_S``) instead of at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from dispatcher.cli.support import api_call, console, err, fail, settings_or_exit, with_store

app = typer.Typer(help="Configure agents' webhooks (through the API; set/rotate-secret fall back to the database).",
                  no_args_is_help=True)


def check_id_option(option: str, field: str, value: str | None) -> None:
    """Exit 2 naming ``option`` (``--agent``, ``AGENT_ID``) when ``value`` is not a valid ``field`` per the id
    grammar of :mod:`bus.names`; ``None`` passes (an option not given)."""
    from rich.markup import escape

    from bus.names import id_problem

    if value is not None and (problem := id_problem(field, value)) is not None:
        raise fail(escape(f"{option}: {problem}"), 2)


def _patterns(events: list[str] | None) -> list[str]:
    return [p.strip() for item in events or [] for p in item.split(",") if p.strip()]


def print_endpoint(e: dict[str, Any]) -> None:
    """One endpoint as the API returns it, as a two-column table (never a secret but the one-time one)."""
    table = Table(show_header=False, box=None)
    for key in ("id", "scope", "agent_id", "organization_id", "url", "events", "enabled", "disabled_reason",
                "has_secret", "previous_secret_valid_until", "failing_since", "created_at", "updated_at"):
        value = e.get(key)
        if value is None or (key in ("agent_id", "organization_id") and not value):
            continue
        table.add_row(key, json.dumps(value) if key == "events" else str(value))
    console.print(table)


@app.command("set")
def webhooks_set(
    agent_id: Annotated[str, typer.Argument(help="Letta agent id")],
    url: Annotated[str, typer.Option(help="where to POST, e.g. https://example.com/hooks/letta")],
    events: Annotated[Optional[list[str]], typer.Option(
        "--events", help="webhook_events pattern; repeat or comma-separate; omit for all events")] = None,
    secret: Annotated[Optional[str], typer.Option(help="signing secret (>= 16 chars); omit to generate one")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="store it disabled")] = False,
    allow_unknown_events: Annotated[bool, typer.Option(help="accept patterns matching no catalog event type")] = False,
) -> None:
    """Create or replace an agent's webhook; running dispatchers apply it within a second."""
    from dispatcher.rules.urls import normalize_webhook_url
    from dispatcher.cli.api_client import ApiClient, ApiError, ApiUnreachable

    check_id_option("AGENT_ID", "agent_id", agent_id)
    try:
        url = normalize_webhook_url(url)
    except ValueError as exc:
        raise fail(f"--url: {exc}", 2) from None
    settings = settings_or_exit()
    body = {"url": url, "events": _patterns(events), "secret": secret, "enabled": not disabled,
            "allow_unknown_events": allow_unknown_events}
    try:
        with ApiClient(settings) as client:
            e = client.call("PUT", f"/v1/agents/{agent_id}/webhook", json=body)
    except ApiError as exc:
        raise fail(exc.message, 2 if exc.status in (401, 422) else 1) from None
    except ApiUnreachable:
        err.print(f"no API at {settings.api_base_url}: writing the database {settings.database_url} directly",
                  highlight=False)
        e = _set_in_database(settings, agent_id, body)
    console.print(f"webhook {e['id']} for {agent_id}: {e['url']} events={e['events'] or 'all'}"
                  f"{'' if e['enabled'] else ' (disabled)'}", highlight=False)
    if e.get("secret"):
        console.print(f"signing secret (shown once): [bold]{e['secret']}[/]", highlight=False)


def _set_in_database(settings, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    from dispatcher.api.validation import unknown_patterns

    if not body["allow_unknown_events"] and (unknown := unknown_patterns(body["events"])):
        try:
            from dispatcher.rules.matching import check_patterns

            check_patterns(unknown)  # a syntax error is the clearer message
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        raise fail(f"events: {unknown[0]!r} matches no known event type; pass --allow-unknown-events for event "
                   "types Letta will add", 2)

    async def action(store):  # noqa: ANN001, ANN202
        endpoint, generated = await store.set_agent_webhook(agent_id, url=body["url"], events=body["events"],
                                                            secret=body["secret"], enabled=body["enabled"])
        return {"id": endpoint.id, "url": endpoint.url, "events": endpoint.events, "enabled": endpoint.enabled,
                "secret": generated}

    try:
        return asyncio.run(with_store(settings, action))
    except ValueError as exc:
        raise fail(str(exc), 2) from None


@app.command("get")
def webhooks_get(agent_id: Annotated[str, typer.Argument(help="Letta agent id")],
                 as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False) -> None:
    """Show an agent's webhook (without its secret)."""
    check_id_option("AGENT_ID", "agent_id", agent_id)
    e = api_call(settings_or_exit(), lambda c: c.call("GET", f"/v1/agents/{agent_id}/webhook"))
    console.print_json(data=e) if as_json else print_endpoint(e)


@app.command("list")
def webhooks_list(scope: Annotated[Optional[str], typer.Option(help="agent, organization or global")] = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List endpoints of every scope (or one)."""
    data = api_call(settings_or_exit(), lambda c: c.call("GET", "/v1/webhooks", params={"scope": scope}))["data"]
    if as_json:
        console.print_json(data=data)
        return
    table = Table(title=f"endpoints ({len(data)})")
    for col in ("id", "scope", "owner", "url", "events", "enabled"):
        table.add_column(col)
    for e in data:
        table.add_row(e["id"], e["scope"], e["agent_id"] or e["organization_id"] or "-", e["url"],
                      ",".join(e["events"]) or "all", "yes" if e["enabled"] else f"no ({e['disabled_reason']})")
    console.print(table)


@app.command("rm")
def webhooks_rm(agent_id: Annotated[str, typer.Argument(help="Letta agent id")]) -> None:
    """Delete an agent's webhook; deliveries already queued for it are skipped."""
    check_id_option("AGENT_ID", "agent_id", agent_id)
    api_call(settings_or_exit(), lambda c: c.call("DELETE", f"/v1/agents/{agent_id}/webhook"))
    console.print(f"webhook of {agent_id} deleted")


@app.command("test")
def webhooks_test(agent_id: Annotated[str, typer.Argument(help="Letta agent id")]) -> None:
    """Send a webhook.test event through the dispatcher and show the attempt (exit 1 unless it succeeded)."""
    from dispatcher.cli.api_client import ApiClient, ApiError, ApiUnreachable

    check_id_option("AGENT_ID", "agent_id", agent_id)
    settings = settings_or_exit()
    try:
        with ApiClient(settings, timeout_s=settings.webhook_test_wait_s + 10) as client:
            r = client.call("POST", f"/v1/agents/{agent_id}/webhook/test")
    except ApiError as exc:
        if exc.status != 504:
            raise fail(f"{exc.message} (HTTP {exc.status})", 2 if exc.status == 422 else 1) from None
        r = {"status": "timeout", "delivery_id": "?", "status_code": None, "duration_ms": None,
             "error": "no attempt in time"}
    except ApiUnreachable as exc:
        raise fail(str(exc)) from None
    code = r["status_code"] if r["status_code"] is not None else "-"
    took = f"{r['duration_ms']:.0f} ms" if r["duration_ms"] is not None else "-"
    color = "green" if r["status"] == "succeeded" else "red"
    console.print(f"[{color}]{r['status']}[/]: HTTP {code} in {took} (delivery {r['delivery_id']})"
                  + (f"; error: {r['error']}" if r.get("error") else ""), highlight=False)
    if r["status"] != "succeeded":
        raise typer.Exit(1)


@app.command("rotate-secret")
def webhooks_rotate_secret(
    agent_id: Annotated[str, typer.Argument(help="Letta agent id")],
    secret: Annotated[Optional[str], typer.Option(help="the new secret (>= 16 chars); omit to generate one")] = None,
) -> None:
    """Give an agent's webhook a new secret; the old one keeps signing for LETTA_BUS_SECRET_ROTATION_WINDOW_S."""
    from dispatcher.cli.api_client import ApiClient, ApiError, ApiUnreachable

    check_id_option("AGENT_ID", "agent_id", agent_id)
    settings = settings_or_exit()
    try:
        with ApiClient(settings) as client:
            new = client.call("POST", f"/v1/agents/{agent_id}/webhook/rotate-secret", json={"secret": secret})["secret"]
    except ApiError as exc:
        raise fail(exc.message, 2 if exc.status in (401, 404, 422) else 1) from None
    except ApiUnreachable:
        err.print(f"no API at {settings.api_base_url}: writing the database {settings.database_url} directly",
                  highlight=False)
        try:
            new = asyncio.run(with_store(settings, lambda store: store.rotate_secret(
                agent_id, window_s=settings.secret_rotation_window_s, secret=secret)))
        except (LookupError, ValueError) as exc:
            raise fail(str(exc), 2) from None
    hours = settings.secret_rotation_window_s / 3600
    console.print(f"new signing secret (shown once): [bold]{new}[/]; the previous one stays valid for {hours:g} h",
                  highlight=False)
