"""The ledger follows Redis: the journal and its writer.

Every transition of a job (waiting, queued, started, success, error, cancelled) is decided by a limiter
script, which appends it to its namespace's journal in the same step (scripts/prelude.lua, `journal`).
The writer carries journals into the ledger in bulk, one MongoDB bulk write for all the namespaces it
flushes, then drops from each journal what it wrote. Entries are idempotent and fenced (`Ledger.write`),
so one written twice, late, or by two writers at once never moves a job back.

When: the process whose scripts journaled flushes those namespaces within QUEUE_LEDGER_LAG_SECONDS, from
a background thread (and at exit); the reaper's pass flushes every namespace with work (what a killed
process left behind); reads through the Queue (`Queue.job`, `Queue.jobs`) flush first, so a caller reads
its own writes and those of every other process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from common.queue.epoch import Generation
from common.queue.ledger import JournalEntry, Ledger
from common.queue.limiter import NamespaceLimiter

logger = logging.getLogger(__name__)
WRITE_BATCH = 5_000  # entries per bulk write (a few seconds of SecantusDB, well within its timeout)
FLUSH_NAMESPACES = 500  # journals read per round trip
MIN_ENTRIES = 10  # entries read from each of them, at least
_STARTING = threading.Lock()


class Journal:
    """Writes the journals of the namespaces this process journaled in, within the lag, in bulk."""

    def __init__(self, limiter: NamespaceLimiter, ledger: Ledger, lag_seconds: float, generation: Generation) -> None:
        self.limiter = limiter
        self.ledger = ledger
        self.lag_seconds = lag_seconds
        # Every write advances Redis' generation (common/queue/epoch.py); one that finds Redis rolled back
        # calls on_rollback once the flush is over (the queue's: repair).
        self.generation = generation
        self.on_rollback: Callable[[], None] = lambda: None
        # The keys whose values change when Redis lost its data and was repaired (the queue's epoch
        # markers), and what to do about entries written across such a repair (the queue's).
        self.markers: Callable[[], list[str]] = list
        self.on_repair: Callable[[list[JournalEntry]], None] = lambda entries: None
        self._pid = 0
        self._reset()
        limiter.on_journal = self.note

    def _reset(self) -> None:
        """The process's own locks and notes (a forked child's are not its parent's)."""
        self._noted: set[str] = set()
        self._rolled_back = False
        self._across_repair: list[JournalEntry] = []  # written while Redis lost its data: for on_repair
        self._repair = threading.local()  # .active: this thread repairs (its writes call for no repair)
        self._lock = threading.Lock()
        self._flushing = threading.RLock()
        self._wake = threading.Event()

    def _take_noted(self) -> list[str]:
        with self._lock:
            noted, self._noted = self._noted, set()
        return sorted(noted)

    def note(self, namespaces: Iterable[str]) -> None:
        """These namespaces may have new entries: flush them within the lag."""
        if self._pid != os.getpid():
            with _STARTING:
                if self._pid != os.getpid():
                    self._start()
        with self._lock:
            self._noted.update(namespaces)
        self._wake.set()

    def flush(self, namespaces: Sequence[str], keep_alive: Callable[[], object] = lambda: None) -> list[str]:
        """Write the entries these namespaces' journals hold now to the ledger (not those that come
        meanwhile: a caller never waits on a backlog that keeps growing), and unlist the namespaces left
        with nothing (see `NamespaceLimiter.unlist_if_idle`), which it returns. One flush at a time in a
        process: its threads never write the same entries twice."""
        if not namespaces:
            return []
        # Whatever these namespaces journaled before now is written here: noted, they would be flushed
        # again for nothing (and at exit, with a server that may be gone). A failed flush notes them again.
        with self._lock:
            self._noted.difference_update(namespaces)
        with self._flushing:
            try:
                idle = self._flush(namespaces, keep_alive)
            except BaseException:
                with self._lock:
                    self._noted.update(namespaces)
                raise
            rolled_back, self._rolled_back = self._rolled_back, False
            across, self._across_repair = self._across_repair, []
        self.limiter.unlist_if_idle(idle)
        # What follows may repair Redis, which takes the repair lock and then this flush's: never while
        # this thread holds the flush (another thread's repair would wait for it, and it for that one).
        if rolled_back:
            self.on_rollback()
        if across:
            self._repair.active = True
            try:
                self.on_repair(across)
            except Exception:
                logger.exception("could not give back to Redis %s job(s) written across a repair", len(across))
            finally:
                self._repair.active = False
        return idle

    def flush_for_repair(self, keep_alive: Callable[[], object]) -> None:
        """Every journal, as a repair reads them first (what Redis, or the snapshot it came back from,
        decided goes to the ledger before the ledger is compared with Redis): without the write's own
        checks, which would call for this very repair."""
        with self._flushing:
            self._repair.active = True
            try:
                self._flush(self.limiter.namespaces(), keep_alive)
            finally:
                self._repair.active = False

    def _flush(self, namespaces: Sequence[str], keep_alive: Callable[[], object] = lambda: None) -> list[str]:
        idle: list[str] = []
        left = dict.fromkeys(namespaces, -1)  # entries still to write; -1: not read yet
        while left:
            names = list(left)
            for start in range(0, len(names), FLUSH_NAMESPACES):
                chunk = names[start : start + FLUSH_NAMESPACES]
                # At most about WRITE_BATCH entries per bulk write, however many namespaces share it.
                count = max(MIN_ENTRIES, WRITE_BATCH // len(chunk))
                wanted = {ns: count if left[ns] < 0 else min(count, left[ns]) for ns in chunk}
                idle += self._write(wanted, left)
                keep_alive()
            left = {namespace: entries for namespace, entries in left.items() if entries > 0}
        return idle

    def _write(self, wanted: dict[str, int], left: dict[str, int]) -> list[str]:
        """Read, write and drop up to `wanted` entries of each journal, counting down `left` (set from the
        journal's length at its first read); the namespaces left with nothing."""
        markers = self.markers()
        read, lengths, before = self.limiter.journals(wanted, markers)
        for namespace in wanted:
            got = len(read.get(namespace, []))
            left[namespace] = 0 if not got else (lengths[namespace] if left[namespace] < 0 else left[namespace]) - got
        if not read:
            return []
        entries = []
        for raw in (raw for namespace_entries in read.values() for raw in namespace_entries):
            try:
                entries.append(JournalEntry.parse(raw))
            except (ValueError, TypeError):  # never written, never blocking the others: dropped, and said
                logger.error("dropping a journal entry that does not parse: %r", raw)
        self.ledger.write(entries)
        idle, after = self.limiter.journaled(read, markers)
        repairing = getattr(self._repair, "active", False)
        if not repairing and not self.generation.advance():
            self._rolled_back = True
        if (None in before or after != before) and not repairing:
            # Redis lost its data meanwhile: a repair may have read the ledger before this write.
            self._across_repair += entries
        return idle

    def flush_all(self) -> None:
        """Write every journal: every namespace with work has its journal listed."""
        self.flush(self.limiter.namespaces())

    def flush_noted(self) -> None:
        """Write the namespaces noted since the last time; on failure they stay noted (and the reaper's
        pass writes them anyway)."""
        noted = self._take_noted()
        if not noted:
            return
        try:
            self.flush(noted)
        except Exception:
            logger.exception("could not write the journals of %s namespace(s) to the ledger", len(noted))
            with self._lock:
                self._noted.update(noted)

    def _start(self) -> None:
        """The writer thread of this process (a forked child starts its own)."""
        self._pid = os.getpid()
        self._reset()
        threading.Thread(target=self._write_forever, name="stepcache-journal", daemon=True).start()
        atexit.register(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        """What is noted and not written yet, if Redis still answers (without retrying: the process is
        going; whatever stays in a journal is written by the reaper's pass). Nothing noted: nothing asked
        of a server that may be gone. Quiet: at exit, the log handlers may write to closed streams (a test
        runner's), and a Redis Cluster client logs the servers it cannot reach."""
        noted = self._take_noted()
        if not noted:
            return
        disabled = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            with contextlib.suppress(Exception):
                self.limiter.redis.ping()
                self._flush(noted)
        finally:
            logging.disable(disabled)

    def _write_forever(self) -> None:
        while True:
            self._wake.wait()
            # Entries noted meanwhile go with these: a burst makes one bulk write per lag.
            time.sleep(self.lag_seconds)
            self._wake.clear()
            with contextlib.suppress(Exception):
                self.flush_noted()
