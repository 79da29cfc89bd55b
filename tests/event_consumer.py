"""A consumer process for the anycast tests: `python -m tests.event_consumer REDIS_URL GROUP NAME`.

Its handler records "begin <dataset>" and "done <dataset>" in the Redis list `test:handled`; on an event
of dataset "slow/ds" it sleeps for a minute first, so a test can SIGKILL it inside the handler.
"""

from __future__ import annotations

import sys
import threading
import time

from common.event_bus import Consumer, EventBus
from common.events import Event
from common.redis_connection import connect

HANDLED_KEY = "test:handled"


def main() -> None:
    url, group, name = sys.argv[1:4]
    client = connect(url)  # one Redis or a cluster
    consumer = Consumer(EventBus(client), group, name=name, claim_idle_ms=60_000)

    @consumer.handler("*")
    def record(event: Event) -> None:
        client.rpush(HANDLED_KEY, f"begin {event.dataset} {name}")
        if event.dataset == "slow/ds":
            time.sleep(60)
        client.rpush(HANDLED_KEY, f"done {event.dataset} {name}")

    consumer.run(threading.Event(), block_ms=100)


if __name__ == "__main__":
    main()
