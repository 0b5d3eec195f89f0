"""``letta-bus deliveries list|show|retry`` and ``letta-bus replay``, through the management API. Bulk retry
and replay run page by page and show progress."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dispatcher.cli.support import api_call, console, fail, settings_or_exit

deliveries_app = typer.Typer(help="Delivery history and manual retry.", no_args_is_help=True)
PAGE = 500


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[note]}"), console=console, transient=False)


@deliveries_app.command("list")
def deliveries_list(
    agent_id: Annotated[str, typer.Argument(help="Letta agent id")],
    status: Annotated[Optional[str], typer.Option(help="pending, retrying, succeeded, failed or skipped")] = None,
    event_type: Annotated[Optional[str], typer.Option(help="e.g. agent.step.completed")] = None,
    since: Annotated[Optional[str], typer.Option(help="RFC 3339 time, e.g. 2026-01-01T00:00:00Z")] = None,
    until: Annotated[Optional[str], typer.Option(help="RFC 3339 time")] = None,
    limit: Annotated[int, typer.Option(help="rows per page")] = 50,
    cursor: Annotated[Optional[str], typer.Option(help="next_cursor of a previous page")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """An agent webhook's deliveries, newest first."""
    params = {"status": status, "event_type": event_type, "since": since, "until": until, "limit": limit,
              "cursor": cursor}
    page = api_call(settings_or_exit(), lambda c: c.call("GET", f"/v1/agents/{agent_id}/webhook/deliveries",
                                                         params=params))
    if as_json:
        console.print_json(data=page)
        return
    table = Table(title=f"deliveries of {agent_id} ({len(page['data'])})")
    for col in ("created", "delivery", "event type", "status", "attempts", "last code", "replayed", "last error"):
        table.add_column(col, no_wrap=col in ("created", "delivery"))  # ids must stay whole to be copied
    for d in page["data"]:
        table.add_row(d["created_at"][:23], d["id"], d["event_type"], d["status"], str(d["attempts"]),
                      str(d["last_status_code"] or "-"), "yes" if d["replayed"] else "", (d["last_error"] or "")[:60])
    console.print(table)
    if page["next_cursor"]:
        console.print(f"more: --cursor {page['next_cursor']}", highlight=False)


@deliveries_app.command("show")
def deliveries_show(delivery_id: Annotated[str, typer.Argument(help="dlv_...")],
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One delivery with every attempt."""
    d = api_call(settings_or_exit(), lambda c: c.call("GET", f"/v1/webhook-deliveries/{delivery_id}"))
    if as_json:
        console.print_json(data=d)
        return
    console.print(f"delivery {d['id']}: {d['event_type']} {d['event_id']} -> endpoint {d['endpoint_id']}\n"
                  f"status {d['status']} after {d['attempts']} attempt(s); event seq {d['event_seq']}"
                  + (f"; replay {d['replay_id']}" if d["replay_id"] else ""), highlight=False)
    table = Table()
    for col in ("#", "at", "code", "ms", "error", "response"):
        table.add_column(col)
    for a in d["attempt_log"]:
        table.add_row(str(a["number"]), a["at"][:23], str(a["status_code"] or "-"), f"{a['duration_ms']:.0f}",
                      (a["error"] or "")[:60], (a["response_excerpt"] or "")[:40])
    console.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[Optional[str], typer.Argument(help="dlv_...; or use --agent with --failed-since")] = None,
    agent: Annotated[Optional[str], typer.Option(help="retry this agent webhook's failed deliveries")] = None,
    failed_since: Annotated[Optional[str], typer.Option(help="with --agent: failed deliveries created since "
                                                        "this RFC 3339 time")] = None,
) -> None:
    """Send one delivery again, or every failed one of an agent's webhook since a time (with progress)."""
    settings = settings_or_exit()
    if delivery_id:
        r = api_call(settings, lambda c: c.call("POST", f"/v1/webhook-deliveries/{delivery_id}/retry"))
        console.print(f"queued {delivery_id} again (was {r['previous_status']} after {r['attempts_so_far']} "
                      "attempt(s))", highlight=False)
        return
    if not (agent and failed_since):
        raise fail("give a delivery id, or --agent and --failed-since", 2)

    def bulk(client) -> tuple[int, dict[str, str]]:  # noqa: ANN001
        queued, refused = 0, {}
        with _progress() as progress:
            task = progress.add_task("retrying failed deliveries", total=None, note="")
            while True:
                r = client.call("POST", f"/v1/agents/{agent}/webhook/retry-failed",
                                json={"since": failed_since, "limit": PAGE})
                queued += r["queued"]
                refused.update(r["refused"])
                progress.update(task, total=queued + len(refused) + r["remaining"], completed=queued + len(refused),
                                note=f"{len(refused)} refused" if refused else "")
                if r["remaining"] == 0 or r["queued"] == 0:
                    return queued, refused

    queued, refused = api_call(settings, bulk)
    console.print(f"queued {queued} failed deliveries of {agent} again", highlight=False)
    for did, why in list(refused.items())[:20]:
        console.print(f"  not retried {did}: {why}", highlight=False)


def replay(
    agent_id: Annotated[str, typer.Argument(help="Letta agent id")],
    since: Annotated[str, typer.Option(help="RFC 3339 time to replay from, e.g. 2026-01-01T00:00:00Z")],
    until: Annotated[Optional[str], typer.Option(help="RFC 3339 time to stop at (default: now)")] = None,
    events: Annotated[Optional[list[str]], typer.Option(
        "--events", help="only these webhook_events patterns (default: the webhook's own)")] = None,
) -> None:
    """Deliver an agent's past events again from the event stream (with progress), as far back as it keeps them."""
    settings = settings_or_exit()
    patterns = [p.strip() for item in events or [] for p in item.split(",") if p.strip()] or None

    def run(client) -> dict[str, Any]:  # noqa: ANN001
        body: dict[str, Any] = {"since": since, "until": until, "events": patterns, "limit": PAGE}
        scanned = queued = 0
        first: int | None = None  # stream sequence before the first event read: progress runs first..end_seq
        with _progress() as progress:
            task = progress.add_task("replaying events", total=None, note="")
            while True:
                r = client.call("POST", f"/v1/agents/{agent_id}/webhook/replay", json=body)
                scanned += r["scanned"]
                queued += r["queued"]
                reached = r["end_seq"] if r["done"] else r["next_seq"] - 1
                if first is None:
                    first = max(reached - r["scanned"], 0)
                progress.update(task, total=max(r["end_seq"] - first, 1), completed=reached - first,
                                note=f"{queued} queued")
                if r["done"]:
                    return {"replay_id": r["replay_id"], "scanned": scanned, "queued": queued}
                body.update(replay_id=r["replay_id"], start_seq=r["next_seq"], end_seq=r["end_seq"])

    result = api_call(settings, run)
    console.print(f"replay {result['replay_id']}: {result['scanned']} events read, {result['queued']} deliveries "
                  "queued (marked replayed in `letta-bus deliveries list`)", highlight=False)
