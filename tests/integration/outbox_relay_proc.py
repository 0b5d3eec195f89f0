"""An outbox relay in its own process, for the crash test (tests/integration/test_outbox.py).

``python -m tests.integration.outbox_relay_proc NATS_URL DATABASE_URL [--batch N] [--pause-after-publish]``

With ``--pause-after-publish`` the relay publishes one batch, prints ``PUBLISHED <n>`` (after the PubAcks, before
the rows are marked) and then waits forever inside that round, holding its transaction: the test SIGKILLs it by
PID right there. Without it the relay runs until nothing is pending, prints ``DONE <published> <duplicates>`` and
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bus.outbox import OutboxRelay, pending_count
from config.settings import Settings


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("nats_url")
    parser.add_argument("database_url")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--pause-after-publish", action="store_true")
    args = parser.parse_args()

    async def pause(event_ids: list[str]) -> None:
        print(f"PUBLISHED {len(event_ids)}", flush=True)
        await asyncio.Event().wait()  # until SIGKILL

    settings = Settings(_env_file=None, nats_url=args.nats_url, database_url=args.database_url)
    relay = OutboxRelay(settings, args.database_url, batch_size=args.batch, poll_interval_s=0.05,
                        after_publish=pause if args.pause_after_publish else None)
    await relay.start()
    print("READY", flush=True)
    try:
        while await pending_count(relay.engine):
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    print(f"DONE {relay.stats.published} {relay.stats.duplicates}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
