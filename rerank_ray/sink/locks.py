"""One run per output partition at a time: a lock object created with an exclusive create.

The lock (``_locks/run_date=YYYY-MM-DD.lock``) holds the run id, host, pid and start time.
The same run id may take over its own lock (resuming a killed run); any other run is refused
with the holder's details.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
from typing import Any

from rerank_ray import storage
from rerank_ray.errors import RerankError
from rerank_ray.sink.location import OutputLocation


class ConcurrentRunError(RerankError, RuntimeError):
    """Another run is writing the same output partition."""


def acquire_lock(out: OutputLocation, path: str) -> None:
    """Create the lock object exclusively; the same run id may take over its own lock."""
    body = json.dumps(
        {
            "run_id": out.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    ).encode()
    if storage.is_s3(out.uri):
        created = _create_exclusive_s3(out.s3, path, body)
    else:
        created = _create_exclusive_local(path, body)
    if created:
        return
    holder = _read_lock(out, path)
    if holder.get("run_id") == out.run_id:
        return  # resuming our own run after it was killed
    raise ConcurrentRunError(
        f"Output {out.uri} is being written by run {holder.get('run_id')} (started "
        f"{holder.get('started')} on {holder.get('host')}), which holds the lock "
        f"{out.display(path)}. Wait for it to finish; if it is dead, resume it with --run-id "
        f"{holder.get('run_id')} or delete the lock object."
    )


def release_lock(out: OutputLocation, path: str) -> None:
    """Delete the lock object if this run holds it."""
    if _read_lock(out, path).get("run_id") != out.run_id:
        return
    with contextlib.suppress(FileNotFoundError, OSError):
        out.fs.delete_file(path)


def _create_exclusive_local(path: str, body: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
    return True


def _create_exclusive_s3(s3: storage.S3Settings, path: str, body: bytes) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = path.split("/", 1)
    try:
        s3.boto3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return False
        raise
    return True


def _read_lock(out: OutputLocation, path: str) -> dict[str, Any]:
    try:
        with out.fs.open_input_stream(path) as fh:
            return json.loads(fh.read() or b"{}")
    except (FileNotFoundError, OSError, ValueError):
        return {}
