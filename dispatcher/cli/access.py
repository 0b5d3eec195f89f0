"""``letta-bus keys create|list|revoke`` and ``letta-bus portal create|revoke``: scoped API keys and console links,
through the management API (``/v1/api-keys``, ``/v1/portal-sessions``) with the CLI's own key."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from dispatcher.cli.support import api_call, console, settings_or_exit

keys_app = typer.Typer(help="Scoped API keys: operator, one organization or one agent; role admin or read.",
                       no_args_is_help=True)
portal_app = typer.Typer(help="Console links (portal sessions) for a tenant, valid for a limited time.",
                         no_args_is_help=True)

ScopeOpt = Annotated[str, typer.Option(help="operator, organization or agent")]
RoleOpt = Annotated[str, typer.Option(help="admin (change, retry, replay, rotate) or read")]
OrgOpt = Annotated[Optional[str], typer.Option("--org", help="organization id (scope organization; or the agent's)")]
AgentOpt = Annotated[Optional[str], typer.Option("--agent", help="agent id (scope agent)")]


def _grant(scope: str, role: str, org: str | None, agent: str | None) -> dict[str, Any]:
    return {"scope": scope, "role": role, "organization_id": org, "agent_id": agent}


@keys_app.command("create")
def keys_create(scope: ScopeOpt, role: RoleOpt = "read", org: OrgOpt = None, agent: AgentOpt = None,
                name: Annotated[str, typer.Option(help="who holds it (shown in listings)")] = "") -> None:
    """Create a key and print it once (it is stored hashed and never shown again)."""
    settings = settings_or_exit()
    body = {**_grant(scope, role, org, agent), "name": name}
    created = api_call(settings, lambda c: c.call("POST", "/v1/api-keys", json=body))
    console.print(f"created {created['id']} ({created['scope']}, {created['role']}); the key, shown once:")
    print(created["key"])


@keys_app.command("list")
def keys_list(include_revoked: Annotated[bool, typer.Option(help="show revoked keys too")] = False) -> None:
    """The keys within the CLI key's scope (id, prefix, scope, role, owner, created, revoked)."""
    settings = settings_or_exit()
    rows = api_call(settings, lambda c: c.call("GET", "/v1/api-keys", params={"include_revoked": include_revoked}))
    table = Table(title=f"API keys ({len(rows['data'])})")
    for column in ("id", "name", "prefix", "scope", "role", "organization", "agent", "created", "revoked"):
        table.add_column(column)
    for k in rows["data"]:
        table.add_row(k["id"], k["name"], k["prefix"] + "…", k["scope"], k["role"], k["organization_id"] or "",
                      k["agent_id"] or "", k["created_at"], k["revoked_at"] or "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="key id (key_...)")]) -> None:
    """Revoke a key: refused from the next request on."""
    settings = settings_or_exit()
    api_call(settings, lambda c: c.call("DELETE", f"/v1/api-keys/{key_id}"))
    console.print(f"revoked {key_id}")


@portal_app.command("create")
def portal_create(scope: ScopeOpt, role: RoleOpt = "admin", org: OrgOpt = None, agent: AgentOpt = None,
                  ttl: Annotated[int, typer.Option(help="seconds the link stays valid (default 1 h)")] = 3600) -> None:
    """Print a console link for a scope (hand it to the tenant; it opens the console for at most TTL seconds)."""
    settings = settings_or_exit()
    body = {**_grant(scope, role, org, agent), "ttl": ttl}
    created = api_call(settings, lambda c: c.call("POST", "/v1/portal-sessions", json=body))
    console.print(f"portal session {created['id']} ({created['scope']}, {created['role']}) until "
                  f"{created['expires_at']}; revoke with: letta-bus portal revoke {created['id']}")
    print(created["url"])


@portal_app.command("revoke")
def portal_revoke(session_id: Annotated[str, typer.Argument(help="portal session id (ps_...)")]) -> None:
    """Revoke a portal session: its link and the console open with it stop working at once."""
    settings = settings_or_exit()
    api_call(settings, lambda c: c.call("DELETE", f"/v1/portal-sessions/{session_id}"))
    console.print(f"revoked {session_id}")
