"""One run per output partition at a time: a lock object created exclusively, kept alive by a
heartbeat.

The lock (``_locks/run_date=YYYY-MM-DD.lock``) holds the run id, host, pid, start time, a
token of this acquisition and a heartbeat time that a daemon thread of the holder rewrites
every ``HEARTBEAT_S`` seconds. Another run id is always refused with the holder's details.
The same run id may take the lock over (to resume after a kill) only when the holder is dead:
its heartbeat is older than ``STALE_AFTER_S``, or it ran on this host and its process is gone.
Two live attempts of one run id would move each other's staged files, so the second is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from rerank_ray.errors import RerankError
from rerank_ray.sink.location import OutputLocation, make_dirs

log = logging.getLogger("rerank_ray")

HEARTBEAT_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_S


class ConcurrentRunError(RerankError, RuntimeError):
    """Another run is writing the same output partition."""


class _Heartbeat:
    """The daemon thread that rewrites this process's lock while the run holds it."""

    def __init__(self, out: OutputLocation, path: str, body: dict[str, Any], etag: str | None):
        self.out, self.path, self.body, self.etag = out, path, body, etag
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="rerank-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            if _read_lock(self.out, self.path).get("token") != self.body["token"]:
                log.error(
                    "run %s lost its lock %s to another attempt; stop this run",
                    self.out.run_id,
                    self.out.display(self.path),
                )
                return
            body = {**self.body, **_now()}
            try:
                self.etag = _put(self.out, self.path, body, if_match=self.etag)
            except OSError as err:  # a store hiccup: the next beat tries again
                log.warning("lock heartbeat %s failed: %s", self.out.display(self.path), err)


_held: dict[str, _Heartbeat] = {}
_held_guard = threading.Lock()


def acquire_lock(out: OutputLocation, path: str) -> None:
    """Take the lock at ``path`` for ``out.run_id`` and start its heartbeat, or raise
    ``ConcurrentRunError`` naming the holder and what to do."""
    body = {
        "run_id": out.run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
        **_now(),
    }
    etag = _create_exclusive(out, path, body)
    if etag is False:
        holder, holder_etag = _read_lock_and_etag(out, path)
        if not holder:  # released between the two calls: try once more
            etag = _create_exclusive(out, path, body)
            holder, holder_etag = _read_lock_and_etag(out, path) if etag is False else ({}, None)
    if etag is False and holder.get("token") == body["token"]:
        etag = holder_etag  # our own create, retried after its reply was lost
    if etag is False:
        if holder.get("run_id") != out.run_id:
            raise ConcurrentRunError(
                f"Output {out.uri} is being written by run {holder.get('run_id')} (started "
                f"{holder.get('started')} on {holder.get('host')}), which holds the lock "
                f"{out.display(path)} ({_liveness(holder)}). Wait for it to finish; if it is "
                f"dead, resume it with --run-id {holder.get('run_id')} or delete the lock object."
            )
        if holder_alive(holder):
            raise ConcurrentRunError(
                f"Run {out.run_id} is already running on {out.uri} (started "
                f"{holder.get('started')} on {holder.get('host')}, pid {holder.get('pid')}, "
                f"lock {out.display(path)} renewed {_age(holder):.0f} s ago). Two attempts of "
                "one run id would move each other's files: wait for it to finish or stop it. "
                f"A dead attempt's lock is taken over once it is {STALE_AFTER_S:.0f} s old "
                "(at once on the same host), or delete the lock object."
            )
        etag = _take_over(out, path, body, holder, holder_etag)
        log.info(
            "run %s takes over the lock %s of its dead attempt (pid %s on %s)",
            out.run_id,
            out.display(path),
            holder.get("pid"),
            holder.get("host"),
        )
    with _held_guard:
        _held[path] = _Heartbeat(out, path, body, etag if isinstance(etag, str) else None)


def release_lock(out: OutputLocation, path: str) -> None:
    """Stop the heartbeat and delete the lock object if this run holds it."""
    with _held_guard:
        beat = _held.pop(path, None)
    if beat is not None:
        beat.stop.set()
        beat.thread.join()
    holder = _read_lock(out, path)
    mine = holder.get("token") == beat.body["token"] if beat else holder.get("run_id") == out.run_id
    if mine:
        try:
            out.delete_file(path)
        except OSError as err:
            log.warning(
                "could not delete the lock %s (%s): it goes stale in %.0f s",
                out.display(path),
                err,
                STALE_AFTER_S,
            )


def lock_is_live(out: OutputLocation, path: str, run_id: str) -> bool:
    """Whether ``run_id`` holds the lock at ``path`` and is alive."""
    holder = _read_lock(out, path)
    return holder.get("run_id") == run_id and holder_alive(holder)


def holder_alive(holder: dict[str, Any]) -> bool:
    """A lock's holder is alive while its heartbeat is fresh and, on this host, its process
    exists."""
    if _age(holder) > STALE_AFTER_S:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # another user's process (or a pid we cannot check): assume alive
    return True


def _liveness(holder: dict[str, Any]) -> str:
    age = _age(holder)
    if age == float("inf"):
        return "it has no heartbeat"
    state = "alive" if holder_alive(holder) else "stale: its run looks dead"
    return f"heartbeat {age:.0f} s ago, {state}"


def _now() -> dict[str, Any]:
    now = time.time()
    iso = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds")
    return {"heartbeat": iso, "heartbeat_unix": now}


def _age(holder: dict[str, Any]) -> float:
    try:
        return time.time() - float(holder["heartbeat_unix"])
    except (KeyError, TypeError, ValueError):
        return float("inf")  # a lock without a heartbeat (an older version's): stale


def _create_exclusive(out: OutputLocation, path: str, body: dict[str, Any]) -> str | bool:
    """Create the lock if absent: its ETag on S3 (True locally), False when it exists."""
    data = json.dumps(body).encode()
    if out.is_s3:
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            reply = out.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise
        return reply["ETag"]
    make_dirs(out.fs, path.rsplit("/", 1)[0])
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def _take_over(
    out: OutputLocation, path: str, body: dict, holder: dict, holder_etag: str | None
) -> str | None:
    """Replace a dead holder's lock, only if it is still that lock (a conditional put on S3;
    locally a rename that only one contender wins)."""
    refused = ConcurrentRunError(
        f"Another attempt of run {out.run_id} took over the lock {out.display(path)} first; "
        "wait for it to finish or stop it."
    )
    if out.is_s3:
        try:
            return _put(out, path, body, if_match=holder_etag)
        except PermissionError:
            raise refused from None
    stale = f"{path}.stale-{body['token']}"
    try:
        os.rename(path, stale)
    except FileNotFoundError:
        raise refused from None
    with open(stale, "rb") as fh:
        grabbed = json.loads(fh.read() or b"{}")
    if grabbed.get("token") != holder.get("token"):
        os.rename(stale, path)  # a contender's fresh lock: put it back
        raise refused
    os.remove(stale)
    if _create_exclusive(out, path, body) is False:
        raise refused
    return None


def _put(out: OutputLocation, path: str, body: dict, if_match: str | None) -> str | None:
    """Rewrite the lock: on S3 only while it is the version ``if_match`` (PermissionError
    otherwise); locally by an atomic rename."""
    data = json.dumps(body).encode()
    if not out.is_s3:
        tmp = f"{path}.tmp-{body['token']}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    extra = {"IfMatch": if_match} if if_match else {}
    try:
        return out.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise PermissionError(f"the lock {out.display(path)} changed") from err
        raise OSError(f"S3 put of {out.display(path)} failed: {err}") from err
    except BotoCoreError as err:
        raise OSError(f"S3 put of {out.display(path)} failed: {err}") from err


def _read_lock_and_etag(out: OutputLocation, path: str) -> tuple[dict[str, Any], str | None]:
    if not out.is_s3:
        return _read_lock(out, path), None
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        reply = out.client.get_object(Bucket=bucket, Key=key)
        return json.loads(reply["Body"].read() or b"{}"), reply["ETag"]
    except (ClientError, BotoCoreError, ValueError):
        return {}, None


def _read_lock(out: OutputLocation, path: str) -> dict[str, Any]:
    try:
        with out.fs.open_input_stream(path) as fh:
            return json.loads(fh.read() or b"{}")
    except (FileNotFoundError, OSError, ValueError):
        return {}
