"""The ``letta-bus`` command line (typer + rich).

Settings come from the environment (``LETTA_BUS_*``, see config/settings.py) and ``.env``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Optional

import typer

from dispatcher.cli import access, broker, history, status, support, webhooks

app = typer.Typer(help="letta-bus: Letta agent events on NATS JetStream, delivered as signed webhooks.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(access.keys_app, name="keys")
app.add_typer(access.portal_app, name="portal")
app.add_typer(history.deliveries_app, name="deliveries")
app.command("replay")(history.replay)
app.command("status")(status.status)
app.add_typer(broker.nats_auth_app, name="nats-auth")
app.command("provision")(broker.provision)
secrets_app = typer.Typer(help="Encryption keys of the stored webhook secrets.", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")
dead_app = typer.Typer(help="Deliveries whose last attempt failed (letta_webhooks.dead.<endpoint_id>).",
                       no_args_is_help=True)
app.add_typer(dead_app, name="dead-letters")

console, err = support.console, support.err
_settings, _fail = support.settings_or_exit, support.fail
_with_store, _with_js = support.with_store, support.with_js


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def up(log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info") -> None:
    """Run letta-bus: embedded nats-server (unless LETTA_BUS_NATS_URL is set), streams, dispatcher."""
    from bus.embedded import EmbeddedServerError
    from dispatcher.api.auth import ApiKeyError
    from dispatcher.cli.runtime import run_loop, running_stack, stop_on_signals
    from dispatcher.delivery.metrics import serve_metrics

    settings = _settings()
    _logging(log_level)

    async def main() -> None:
        with stop_on_signals() as stop:
            async with running_stack(settings) as stack:
                s = stack.settings
                where = f"embedded nats-server {s.nats_url}" if stack.server else f"NATS {s.nats_url}"
                if stack.server and stack.server.http_port:
                    where += f" (monitoring http://127.0.0.1:{stack.server.http_port})"
                if stack.auth is not None:
                    console.print(broker.credentials_summary(stack.auth.directory), highlight=False, soft_wrap=True)
                if stack.api is not None:
                    keys = "LETTA_BUS_API_KEYS" if s.api_keys else f"the key in {s.api_key_file} (development)"
                    console.print(f"API {stack.api.url} (OpenAPI {stack.api.url}/openapi.json); authenticate "
                                  f"with 'Authorization: Bearer <key>' using {keys}", highlight=False)
                console.print(f"[bold green]letta-bus up[/]: {where}; streams {s.events_stream}, "
                              f"{s.webhooks_stream}; durables {s.fanout_durable}, {s.sender_durable}; "
                              f"database {s.database_url}")
                if s.metrics_port:
                    serve_metrics(s.metrics_host, s.metrics_port)
                    console.print(f"metrics http://{s.metrics_host}:{s.metrics_port}/metrics")
                legacy = None
                if s.step_complete_webhook:  # Letta's own variable: the legacy step-complete webhook runs here too
                    from subscribers.legacy_step_webhook import LegacyStepWebhook

                    legacy = await LegacyStepWebhook(s).start()
                    console.print(f"legacy step-complete webhook -> {s.step_complete_webhook} "
                                  f"(durable {s.legacy_webhook_durable})")
                console.print("dispatcher running; Ctrl-C stops it (in-flight deliveries finish or stay unacked)")
                await stop.wait()
                console.print("stopping: draining the dispatcher")
                if legacy is not None:
                    await legacy.stop()
        console.print("stopped")

    try:
        run_loop(main(), settings)
    except (EmbeddedServerError, ConnectionError, ApiKeyError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(timeout: Annotated[float, typer.Option(help="seconds to wait for deliveries")] = 60.0) -> None:
    """Replay a realistic Letta agent session through a self-contained letta-bus and check every delivery."""
    from dispatcher.cli.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    raise typer.Exit(asyncio.run(run_demo(console, timeout_s=timeout)))


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(help="e.g. agent.step.completed")],
    agent: Annotated[str, typer.Option("--agent", help="Letta agent id")],
    data: Annotated[str, typer.Option("--data", help="event data as a JSON object")] = "{}",
    organization: Annotated[Optional[str], typer.Option("--org", help="Letta organization id")] = None,
    event_id: Annotated[Optional[str], typer.Option(help="reuse an id to publish idempotently")] = None,
) -> None:
    """Publish one event (to LETTA_BUS_NATS_URL, or the embedded server's default address)."""
    from bus.catalog import EventValidationError
    from bus.connection import connect
    from bus.publisher import EventPublisher, PublishError

    webhooks.check_id_option("--agent", "agent_id", agent)
    webhooks.check_id_option("--org", "organization_id", organization)
    webhooks.check_id_option("--event-id", "event_id", event_id)
    settings = _settings()
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise _fail(f"--data is not JSON ({exc}); example: --data '{{\"step_id\": \"step-1\", \"status\": \"success\"}}'",
                    2) from None

    async def main() -> str:
        nc = await connect(settings.client_url, name="letta-bus-cli", timeout_s=settings.connect_timeout_s,
                           settings=settings, role="publisher")
        try:
            publisher = EventPublisher(settings.model_copy(update={"nats_url": settings.client_url}), nc)
            return await publisher.publish_event(agent, event_type, payload, organization_id=organization,
                                                 event_id=event_id, strict=True)
        finally:
            await nc.drain()

    try:
        published = asyncio.run(main())
    except EventValidationError as exc:
        raise _fail(str(exc), 2) from None
    except (PublishError, ConnectionError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"published {event_type} {published} to {settings.event_subject(event_type)}")


@app.command()
def tail(
    subject: Annotated[str, typer.Argument(help="subject filter, e.g. 'letta.agent.>'")] = "letta.>",
    since: Annotated[Optional[str], typer.Option(
        help="'all', a stream sequence, or an ISO time (2026-01-01T00:00:00Z); default: new events only")] = None,
    count: Annotated[Optional[int], typer.Option(help="stop after this many events")] = None,
) -> None:
    """Print live events, one line each (an ordered consumer: it changes nothing on the server)."""
    from datetime import datetime

    from dispatcher.cli.runtime import stop_on_signals
    from subscribers.tail import tail as run_tail

    settings = _settings()
    start = None
    if since:
        try:
            start = "all" if since == "all" else int(since) if since.isdigit() else datetime.fromisoformat(
                since.replace("Z", "+00:00"))
        except ValueError:
            raise _fail(f"--since {since!r}: use 'all', a stream sequence or an ISO time", 2) from None
    target = settings.model_copy(update={"nats_url": settings.client_url})

    async def main() -> None:
        with stop_on_signals() as stop:
            await run_tail(target, subject, since=start, out=console.print, max_events=count, stop=stop)

    try:
        asyncio.run(main())
    except ConnectionError as exc:
        raise _fail(str(exc)) from None


@app.command()
def bridge(log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info") -> None:
    """Events for an unmodified Letta: serve its STEP_COMPLETE_WEBHOOK and run/job callback_url notifications."""
    from dispatcher.bridge.server import BridgeServer
    from dispatcher.cli.runtime import stop_on_signals

    settings = _settings()
    _logging(log_level)

    async def main() -> None:
        with stop_on_signals() as stop:
            async with BridgeServer(settings) as server:
                console.print(f"[bold green]letta-bus bridge[/] on {server.url}: Letta's STEP_COMPLETE_WEBHOOK = "
                              f"{server.url}/letta/step-complete, callback_url = {server.url}/letta/callback; "
                              f"reading {settings.letta_base_url}, publishing to {settings.client_url}")
                await stop.wait()
        console.print("stopped")

    try:
        asyncio.run(main())
    except (ValueError, ConnectionError, OSError) as exc:
        raise _fail(str(exc)) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def instrument(
    command: Annotated[Optional[list[str]], typer.Argument(help="the command to run, after --")] = None,
) -> None:
    """Run CMD with letta-bus loaded into its Python process: letta-bus instrument -- letta server ..."""
    from bus.instrument.launcher import LaunchError, exec_instrumented

    try:
        exec_instrumented(command or [])
    except LaunchError as exc:
        raise _fail(str(exc), 2) from None
    except OSError as exc:
        raise _fail(f"could not run {command[0]!r}: {exc}") from None


@app.command("legacy-step-webhook")
def legacy_step_webhook(log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info") -> None:
    """POST {"step_id"} to STEP_COMPLETE_WEBHOOK for every finished step, as Letta does, with retries."""
    from subscribers.legacy_step_webhook import LegacyStepWebhook

    settings = _settings()
    _logging(log_level)
    target = settings.model_copy(update={"nats_url": settings.client_url})
    try:
        legacy = LegacyStepWebhook(target)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"legacy step-complete webhook -> {settings.step_complete_webhook} (durable "
                  f"{settings.legacy_webhook_durable} on {target.nats_url}); Ctrl-C stops it")
    try:
        asyncio.run(legacy.run_forever())
    except (ConnectionError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    console.print("stopped")


@secrets_app.command("rotate-keys")
def secrets_rotate_keys() -> None:
    """Re-encrypt every stored webhook secret with the first key of LETTA_BUS_SECRET_KEYS."""
    settings = _settings()
    changed = asyncio.run(_with_store(settings, lambda store: store.reencrypt_secrets()))
    console.print(f"re-encrypted {changed} secret(s) with the current key; keys after the first can now be removed")


@dead_app.command("list")
def dead_letters_list(endpoint: Annotated[Optional[str], typer.Option(help="endpoint id")] = None) -> None:
    """Show dead letters: endpoint, event, attempts, last error."""
    from rich.table import Table

    from dispatcher.ops.dead_letters import list_dead_letters

    settings = _settings()
    letters = asyncio.run(_with_js(settings, lambda js: list_dead_letters(js, settings, endpoint)))
    table = Table(title=f"dead letters ({len(letters)})")
    for col in ("seq", "endpoint", "event", "type", "attempts", "failed at", "last error"):
        table.add_column(col)
    for d in letters:
        table.add_row(str(d.seq), d.task.endpoint_id, d.task.event_id, d.task.event_type, str(d.attempts),
                      d.failed_at, d.last_error[:80])
    console.print(table)


@dead_app.command("resend")
def dead_letters_resend(
    endpoint: Annotated[Optional[str], typer.Option(help="only this endpoint's dead letters")] = None,
    seq: Annotated[Optional[list[int]], typer.Option(help="only these stream sequences (repeat)")] = None,
) -> None:
    """Send dead letters again, each with a full set of attempts; they leave the dead-letter subject."""
    from dispatcher.ops.dead_letters import list_dead_letters, resend

    settings = _settings()

    async def run(js):  # noqa: ANN001, ANN202
        letters = await list_dead_letters(js, settings, endpoint)
        chosen = [d for d in letters if not seq or d.seq in seq]
        return await resend(js, settings, chosen)

    sent = asyncio.run(_with_js(settings, run))
    console.print(f"resent {sent} dead letter(s)")


if __name__ == "__main__":
    app()
