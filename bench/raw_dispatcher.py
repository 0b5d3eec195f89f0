"""The raw baseline of bench/e2e.py: plain nats-py + aiohttp, no letta-bus code.

``python bench/raw_dispatcher.py NATS_URL STREAM DURABLE BASE_URL COUNT``: pulls from a durable in batches of 256,
POSTs each body to ``BASE_URL/<n % 64>`` with at most 256 requests in flight, acks on a 2xx, and exits after
COUNT acks. The same shape of work as letta-bus's sender, minus fan-out, signing, history and policy.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import nats


async def main(url: str, stream: str, durable: str, base: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable, stream)
    slots = asyncio.Semaphore(256)
    done = 0
    finished = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def send(msg, n: int) -> None:  # noqa: ANN001
            nonlocal done
            try:
                async with session.post(f"{base}/{n % 64}", data=msg.data,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status < 300:
                        await msg.ack()
                        done += 1
                        if done >= count:
                            finished.set()
            finally:
                slots.release()

        n = 0
        while not finished.is_set():
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except asyncio.TimeoutError:
                continue
            for msg in msgs:
                await slots.acquire()
                asyncio.create_task(send(msg, n))
                n += 1
        await asyncio.sleep(0.2)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
