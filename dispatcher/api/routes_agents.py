"""An agent's webhook: ``/v1/agents/{agent_id}/webhook`` (PUT, GET, DELETE), ``/test`` and ``/rotate-secret``.

The shapes follow the webhook API a Letta fork documents (PUT with url, secret, events, enabled). Every write is
announced to the running dispatchers (:mod:`dispatcher.delivery.control`). Scope (:mod:`dispatcher.api.scoping`):
an agent's webhook is visible to the operator, to the organization it names, and to that agent's keys; a webhook
created by an organization's or agent's credential names the credential's organization."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, HTTPException, Response, status

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.schemas import AgentIdPath, EndpointOut, RotateIn, SecretOut, TestResult, WebhookIn
from dispatcher.api.scoping import owner_organization, visible_agent_webhook
from dispatcher.api.validation import check_endpoint_input
from dispatcher.ops.ping import send_test
from dispatcher.store.models import Endpoint

router = APIRouter(prefix="/v1/agents/{agent_id}/webhook", tags=["agent webhook"])


async def agent_endpoint(agent_id: str, ctx: ApiContext, principal: Principal) -> Endpoint:
    """The agent's webhook, or 404 naming the agent (also when it is outside ``principal``'s scope)."""
    endpoint = await visible_agent_webhook(ctx, principal, agent_id)
    if endpoint is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"agent {agent_id} has no webhook: PUT one first")
    return endpoint


@router.put("", response_model=EndpointOut, responses={201: {"model": EndpointOut}, 422: {}})
async def put_webhook(agent_id: AgentIdPath, body: WebhookIn, response: Response,
                      ctx: ApiContext = Depends(get_ctx),
                      principal: Principal = Depends(get_principal)) -> EndpointOut:
    """Create or replace the agent's webhook (201 when created; the generated secret is in ``secret``, once).
    ``organization_id`` (the agent's organization) is taken from an organization's or agent's credential; the
    operator may give it. 404 when the agent's webhook belongs to another scope."""
    existing = await visible_agent_webhook(ctx, principal, agent_id)
    principal.need_admin()
    organization_id = owner_organization(principal, body.organization_id)
    url = check_endpoint_input(ctx.store, url=body.url, events=body.events, secret=body.secret,
                               allow_unknown_events=body.allow_unknown_events)
    created = existing is None
    endpoint, generated = await ctx.store.set_agent_webhook(
        agent_id, url=url, events=body.events, secret=body.secret, enabled=body.enabled,
        organization_id=organization_id)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    await ctx.changed(endpoint.id, "created" if created else "updated")
    return EndpointOut.of(endpoint, generated)


@router.get("", response_model=EndpointOut)
async def get_webhook(agent_id: AgentIdPath, ctx: ApiContext = Depends(get_ctx),
                      principal: Principal = Depends(get_principal)) -> EndpointOut:
    """The agent's webhook without its secret (``has_secret`` says whether one is set)."""
    return EndpointOut.of(await agent_endpoint(agent_id, ctx, principal))


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(agent_id: AgentIdPath, ctx: ApiContext = Depends(get_ctx),
                         principal: Principal = Depends(get_principal)) -> Response:
    """Delete the agent's webhook; queued deliveries to it are skipped. 404 when it has none."""
    await agent_endpoint(agent_id, ctx, principal)
    principal.need_admin()
    endpoint = await ctx.store.delete_agent_webhook(agent_id)
    if endpoint is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"agent {agent_id} has no webhook")
    await ctx.changed(endpoint.id, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/test", response_model=TestResult, responses={409: {}, 504: {"model": TestResult}})
async def test_webhook(agent_id: AgentIdPath, response: Response, ctx: ApiContext = Depends(get_ctx),
                       principal: Principal = Depends(get_principal)) -> TestResult:
    """Send a ``webhook.test`` event through the sender and return the first attempt's outcome (status code,
    duration in ms, error). 409 when the webhook is disabled; 504 when no attempt came within
    ``LETTA_BUS_WEBHOOK_TEST_WAIT_S``."""
    endpoint = await agent_endpoint(agent_id, ctx, principal)
    principal.need_admin()
    return await run_test(endpoint, response, ctx)


async def run_test(endpoint: Endpoint, response: Response, ctx: ApiContext) -> TestResult:
    """Shared by the agent and the ``/v1/webhooks`` test routes."""
    if not endpoint.enabled:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"endpoint {endpoint.id} is disabled ({endpoint.disabled_reason}): enable it first")
    if ctx.dispatcher is not None and ctx.dispatcher.endpoints.get(endpoint.id) is None:
        await ctx.dispatcher.endpoints.apply(endpoint.id)  # created a moment ago: make sure the sender knows it
    outcome = await send_test(ctx.js, ctx.settings, ctx.store, endpoint)
    if outcome.status == "timeout":
        response.status_code = status.HTTP_504_GATEWAY_TIMEOUT
    return TestResult(**outcome.__dict__)


@router.post("/rotate-secret", response_model=SecretOut, responses={404: {}, 422: {}})
async def rotate_secret(agent_id: AgentIdPath, body: RotateIn | None = Body(None),
                        ctx: ApiContext = Depends(get_ctx), principal: Principal = Depends(get_principal)) -> SecretOut:
    """Give the webhook a new secret, returned once; the previous one keeps signing (a second
    ``webhook-signature``) for ``LETTA_BUS_SECRET_ROTATION_WINDOW_S`` seconds."""
    endpoint = await agent_endpoint(agent_id, ctx, principal)
    principal.need_admin()
    return await rotate(endpoint, body, ctx)


async def rotate(endpoint: Endpoint, body: RotateIn | None, ctx: ApiContext) -> SecretOut:
    """Shared by the agent and the ``/v1/webhooks`` rotate routes."""
    secret = body.secret if body else None
    check_endpoint_input(ctx.store, secret=secret)
    try:
        new = await ctx.store.rotate_endpoint_secret(endpoint.id, window_s=ctx.settings.secret_rotation_window_s,
                                                     secret=secret)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    await ctx.changed(endpoint.id, "secret-rotated")
    fresh = await ctx.store.get_endpoint(endpoint.id)
    return SecretOut(endpoint_id=endpoint.id, secret=new,
                     previous_secret_valid_until=EndpointOut.of(fresh).previous_secret_valid_until if fresh else None)
