"""The journal: every answered request, one JSON line each, appended as it arrives.

A line is written and flushed the moment its reply arrives, so a killed process loses no answered
request (the operating system holds what was written); `os.fsync` follows within `sync_every_s`,
from a thread of its own (one fsync for the lines of that interval, not one per line, and never
in the way of the requests: an fsync took 11 ms on this machine's disk under load), so a power cut
loses at most that much. On open, a torn last line (a kill in the middle of a write) is cut off, lines of another spec
(another generation hash) are left alone and ignored, and the first line of a key wins: a resumed
run asks only what the journal does not answer, and builds its output from the journal, so it holds
each request once whatever happened before.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from loraforge.errors import LoraforgeError

try:
    import orjson

    def _dumps(entry: dict) -> bytes:
        return orjson.dumps(entry)
except ImportError:  # pragma: no cover
    def _dumps(entry: dict) -> bytes:
        return json.dumps(entry, ensure_ascii=False).encode()


class Journal:
    def __init__(self, path: str | Path, spec_hash: str, *, sync_every_s: float = 0.05):
        self.path, self.spec_hash, self.sync_every_s = Path(path), spec_hash, sync_every_s
        self.entries: dict[str, dict] = {}
        self.other_specs = 0
        self.torn = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("ab")
        except OSError as e:
            raise LoraforgeError(f"cannot write the journal: {e.strerror}", where=str(self.path)) from None
        self._lock()
        self._load()
        self.resumed = len(self.entries)
        self._dirty = threading.Event()
        self._closing = False
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-fsync", daemon=True)
        self._syncer.start()

    def _lock(self) -> None:
        """One run per journal: a second one would write the same requests again."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise LoraforgeError("another `data synth` run is writing this journal", where=str(self.path),
                                 hint="wait for it to finish, or give this run another output path") from None

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1
        if good < len(data):  # a torn last line: cut it off so appends start on a fresh line
            self.torn = 1
            with self.path.open("r+b") as f:
                f.truncate(good)
        for n, line in enumerate(data[:good].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise LoraforgeError(f"journal line {n} is not JSON", where=f"{self.path}:{n}",
                                     hint="the journal was edited; delete it to start afresh") from None
            if entry.get("spec") != self.spec_hash:
                self.other_specs += 1
                continue
            self.entries.setdefault(entry["key"], entry)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def append(self, entry: dict) -> None:
        """Record one answered request (first one wins), flushed now, fsync'd within sync_every_s."""
        if entry["key"] in self.entries:
            return
        entry = {"spec": self.spec_hash, **entry}
        self.entries[entry["key"]] = entry
        self._f.write(_dumps(entry) + b"\n")
        self._f.flush()
        self._dirty.set()

    def _sync_loop(self) -> None:
        while not self._closing:
            self._dirty.wait()
            self._dirty.clear()
            try:
                os.fsync(self._f.fileno())
            except (OSError, ValueError):  # closed under us at the end: close() syncs itself
                return
            time.sleep(self.sync_every_s)

    def sync(self) -> None:
        """fsync now (the background thread does it within sync_every_s anyway)."""
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._closing = True
        self._dirty.set()
        self._syncer.join()
        self.sync()
        self._f.close()
