"""Where bytes live: URI -> pyarrow filesystem, S3 settings, and the per-node model cache.

Credentials are never passed around explicitly: pyarrow and boto3 each resolve them on the
machine that uses them through the standard AWS chain (environment, profile, instance or
container role). Only the endpoint, region and TLS setting travel with the job config, so
no secret can reach a log line, a pickled task or the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from rerank_ray.errors import RerankError

WEIGHT_SAFE_SUFFIXES = (".safetensors",)
WEIGHT_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_COMPLETE_MARKER = ".rerank-ray-complete"


class StorageError(RerankError, RuntimeError):
    """An input/output location cannot be used; the message says which and what to do."""


class ModelLoadError(RerankError, RuntimeError):
    """A model cannot be loaded safely; the message says why and what to do."""


@dataclass(frozen=True)
class S3Settings:
    """Non-secret S3 connection settings (endpoint, region, TLS verification)."""

    endpoint_url: str | None = None
    region: str | None = None
    verify_tls: bool = True

    @classmethod
    def resolve(cls, endpoint_url: str | None, region: str | None, verify_tls: bool) -> S3Settings:
        """Fill unset values from the standard AWS environment variables."""
        endpoint = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint_url=endpoint, region=region, verify_tls=verify_tls)

    def boto3_client(self):
        """A boto3 S3 client; credentials from the default AWS chain."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            verify=self.verify_tls,
        )

    def arrow_filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem; credentials from the default AWS chain."""
        kwargs: dict = {}
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        # Retries with backoff for throttling (SlowDown) and transient 5xx.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=8)
        return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> ``("bucket", "key/prefix")``."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def resolve(uri: str, s3: S3Settings) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it). Local paths are made absolute."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not bucket:
            raise StorageError(f"{uri!r} has no bucket name; use s3://bucket/prefix/.")
        return s3.arrow_filesystem(), f"{bucket}/{key}".rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(
            f"Unsupported URI scheme in {uri!r}: use s3://bucket/prefix/ or a local path."
        )
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def display(uri: str, path: str) -> str:
    """A filesystem path as the user wrote its location: ``s3://bucket/key`` or local."""
    return f"s3://{path}" if is_s3(uri) else path


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for both local and S3 paths."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def describe_error(err: BaseException) -> str:
    """A short, secret-free description of a storage error with the usual fix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lower = text.lower()
    if "nosuchbucket" in lower or "bucket does not exist" in lower or "no_such_bucket" in lower:
        hint = "the bucket does not exist: check the bucket name and the endpoint/region"
    elif (
        "access_denied" in lower
        or "accessdenied" in lower
        or "invalidaccesskeyid" in lower
        or "signaturedoesnotmatch" in lower
        or "forbidden" in lower
        or "403" in lower
    ):
        hint = (
            "access denied: check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / "
            "instance role) and the bucket policy"
        )
    elif "curl" in lower or "connect" in lower or "timeout" in lower:
        hint = "the endpoint cannot be reached: check --s3-endpoint-url / AWS_ENDPOINT_URL"
    else:
        hint = "check the path, the endpoint and the credentials"
    return f"{hint} ({type(err).__name__}: {text})"


# ----------------------------------------------------------------------------------------
# Model resolution: hub id, local directory or s3:// prefix -> local directory
# ----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("RERANK_RAY_CACHE", Path.home() / ".cache" / "rerank-ray"))


def resolve_model(
    model: str,
    *,
    s3: S3Settings,
    revision: str | None = None,
    cache_dir: str | None = None,
    allow_pickle_weights: bool = False,
) -> Path:
    """Return a local directory holding the model, downloading it once per node if needed.

    Raises ``ModelLoadError`` when the directory has no weights, or only pickle weights and
    ``allow_pickle_weights`` is off.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if is_s3(model):
        local = _download_s3_model(model, s3, cache / "models")
    elif os.path.isdir(os.path.expanduser(model)):
        local = Path(os.path.expanduser(model)).resolve()
    elif model.startswith(("/", ".", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelLoadError(
            f"Model directory {model!r} does not exist: pass an existing local directory, "
            "an s3://bucket/prefix/ holding the model, or a Hugging Face hub id."
        )
    else:
        local = _download_hub_model(model, revision, allow_pickle_weights)
    check_weights(local, allow_pickle_weights, source=model)
    return local


def check_weights(local: Path, allow_pickle_weights: bool, source: str) -> None:
    """Safetensors weights are required unless pickle weights are explicitly allowed."""
    files = [p.name for p in local.iterdir() if p.is_file()]
    safe = [f for f in files if f.endswith(WEIGHT_SAFE_SUFFIXES)]
    pickle = [f for f in files if f.endswith(WEIGHT_PICKLE_SUFFIXES)]
    if safe:
        return
    if pickle and not allow_pickle_weights:
        raise ModelLoadError(
            f"Model {source!r} has only pickle weights ({', '.join(sorted(pickle))}); loading "
            "pickle files can run arbitrary code. Convert them to safetensors, or pass "
            "--allow-pickle-weights if you trust the source."
        )
    if not pickle:
        raise ModelLoadError(
            f"Model {source!r} (local copy {local}) has no weight files (*.safetensors); "
            "check that the directory or prefix holds a saved Hugging Face model."
        )


# Model types whose position ids start after the pad id (HF's RobertaEmbeddings and its
# copies): position i uses row pad_token_id + 1 + i of the position embeddings.
_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert")


def check_max_length(model_dir: Path, max_length: int) -> None:
    """Raise ``ModelLoadError`` if pairs of ``max_length`` tokens need more positions than the
    model has (its forward would fail with an index error on the first long pair).

    Usable positions are ``max_position_embeddings`` from ``config.json`` minus the position
    offset (``pad_token_id + 1`` for XLM-R/RoBERTa, 0 for BERT). Models without that key, or
    with relative positions (DeBERTa without absolute ones, ``position_embedding_type``
    other than absolute), are not checked.
    """
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the model's loader reports an unreadable config in its own words
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return
    if config.get("position_embedding_type", "absolute") != "absolute":
        return
    model_type = config.get("model_type", "")
    if model_type.startswith("deberta") and not config.get("position_biased_input", True):
        return
    offset = 0
    if model_type in _POSITIONS_AFTER_PAD:
        offset = int(config.get("pad_token_id") or 0) + 1
    usable = positions - offset
    if max_length > usable:
        raise ModelLoadError(
            f"max_length {max_length} exceeds the model's {usable} usable positions "
            f"(max_position_embeddings {positions} in {path}"
            + (f", minus {offset} for the {model_type} position offset" if offset else "")
            + f"): pass --max-length {usable} or less."
        )


def weights_fingerprint(local: Path) -> str:
    """sha256 over the weight files' names and contents: which weights produced the scores."""
    digest = hashlib.sha256()
    weight_files = sorted(
        p for p in local.iterdir() if p.name.endswith(WEIGHT_SAFE_SUFFIXES + WEIGHT_PICKLE_SUFFIXES)
    )
    for path in weight_files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _download_hub_model(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # hub errors are many types; all mean the same to the user
        raise ModelLoadError(
            f"Could not fetch model {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Pass a local directory or an s3:// prefix with --model, or check network "
            "access and HF_TOKEN."
        ) from err


def _download_s3_model(uri: str, s3: S3Settings, root: Path) -> Path:
    """Download every object under the prefix into ``root/<key>``, atomically.

    The cache key covers the objects' keys, sizes and ETags, so a changed model is fetched
    again. The download lands in a temporary directory that is renamed into place only when
    complete, so concurrent actors on a node never see a partial directory.
    """
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3.boto3_client()
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and "/" not in rel:  # a model directory is flat
                    objects.append((rel, obj["Size"], obj.get("ETag", "")))
    except Exception as err:
        raise ModelLoadError(f"Cannot list model prefix {uri}: {describe_error(err)}") from err
    if not objects:
        raise ModelLoadError(f"Model prefix {uri} holds no files; upload a saved model there.")
    key = hashlib.sha256(json.dumps([uri, sorted(objects)]).encode()).hexdigest()[:16]
    final = root / key
    if (final / _COMPLETE_MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-{uuid.uuid4().hex[:6]}-", dir=root))
    try:
        for rel, _, _ in objects:
            client.download_file(bucket, prefix + rel, str(tmp / rel))
        (tmp / _COMPLETE_MARKER).write_text(uri)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).exists():
                raise
            # Another process on this node finished first; its copy is identical.
    except Exception as err:
        raise ModelLoadError(f"Downloading model from {uri} failed: {describe_error(err)}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
