"""What a :class:`~dispatcher.api.auth.Principal` may see: the scope rules of every route (issue 13).

- operator: everything.
- organization ``O``: endpoints whose ``organization_id`` is ``O``: its organization endpoints and the agent
  endpoints of its agents. An agent endpoint belongs to an organization through its own ``organization_id``,
  stamped when an organization's (or agent's) credential creates it, or given by the operator; the dispatcher
  delivers to such an endpoint only events whose envelope names that organization
  (:meth:`dispatcher.delivery.endpoints.EndpointIndex.match`), so registering another tenant's agent id yields
  none of its events. Agent endpoints without an organization, and global endpoints, are the operator's.
- agent ``A``: the agent endpoint of ``A`` (of its organization, when the credential names one).

Deliveries, attempts, dead letters, retries and replays are visible through their endpoint. Anything outside
the scope answers 404, exactly like a resource that does not exist, and nothing changes.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from sqlalchemy import ColumnElement, and_, select

from dispatcher.api.auth import Principal
from dispatcher.api.context import ApiContext
from dispatcher.store.access import Grant
from dispatcher.store.models import Delivery, Endpoint


def endpoint_clause(grant: Grant) -> ColumnElement[bool] | None:
    """The SQL condition on ``endpoints`` of what ``grant`` sees; None for everything (operator)."""
    if grant.scope == "operator":
        return None
    if grant.scope == "organization":
        return and_(Endpoint.organization_id == grant.organization_id, Endpoint.scope != "global")
    agent = and_(Endpoint.scope == "agent", Endpoint.agent_id == grant.agent_id)
    return agent if grant.organization_id is None else and_(agent, Endpoint.organization_id == grant.organization_id)


def delivery_clause(grant: Grant) -> ColumnElement[bool] | None:
    """The SQL condition on ``deliveries``: those to an endpoint ``grant`` sees; None for everything."""
    where = endpoint_clause(grant)
    return None if where is None else Delivery.endpoint_id.in_(select(Endpoint.id).where(where))


def sees(grant: Grant, endpoint: Endpoint | None) -> bool:
    """True when ``grant`` sees ``endpoint`` (the Python form of :func:`endpoint_clause`)."""
    if endpoint is None:
        return False
    if grant.scope == "operator":
        return True
    if grant.scope == "organization":
        return endpoint.scope != "global" and endpoint.organization_id == grant.organization_id
    return (endpoint.scope == "agent" and endpoint.agent_id == grant.agent_id
            and (grant.organization_id is None or endpoint.organization_id == grant.organization_id))


def not_found(what: str) -> HTTPException:
    """The 404 of a resource that does not exist or is outside the caller's scope (the two look the same)."""
    return HTTPException(status.HTTP_404_NOT_FOUND, what)


async def visible_endpoint(ctx: ApiContext, principal: Principal, endpoint_id: str) -> Endpoint:
    """The endpoint, or 404 when it does not exist or ``principal`` does not see it."""
    endpoint = await ctx.store.get_endpoint(endpoint_id)
    if not sees(principal.grant, endpoint):
        raise not_found(f"no endpoint {endpoint_id}")
    return endpoint  # type: ignore[return-value]


async def visible_agent_webhook(ctx: ApiContext, principal: Principal, agent_id: str) -> Endpoint | None:
    """The agent's webhook when ``principal`` sees it; None when the agent has none; 404 when it has one outside
    the scope, or ``agent_id`` is not the agent of an agent-scoped credential."""
    if principal.grant.scope == "agent" and agent_id != principal.grant.agent_id:
        raise not_found(f"agent {agent_id} has no webhook")
    endpoint = await ctx.store.get_agent_webhook(agent_id)
    if endpoint is not None and not sees(principal.grant, endpoint):
        raise not_found(f"agent {agent_id} has no webhook")
    return endpoint


def owner_organization(principal: Principal, requested: str | None) -> str | None:
    """The ``organization_id`` a new endpoint gets when ``principal`` creates it: the credential's own
    organization (a different ``requested`` one is refused with 403 naming the field), or for the operator the
    ``requested`` one."""
    own = principal.grant.organization_id
    if principal.is_operator:
        return requested
    if requested is not None and requested != own:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"organization_id: this credential is scoped to organization "
                            f"{own}; leave organization_id out or give {own}")
    return own
