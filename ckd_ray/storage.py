"""URIs for everything the system reads and writes: a local path, `file://`, or `s3://bucket/key`.

S3 goes through boto3 (and pyarrow's S3 filesystem for streaming reads). Credentials and the
endpoint come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, ...) exactly as boto3 reads them; nothing here logs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "file" or "s3"; for s3 `bucket` and `key` (no leading slash)."""

    scheme: str
    path: str
    bucket: str = ""

    @property
    def key(self) -> str:
        return self.path

    def join(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        if self.scheme == "s3":
            return Location("s3", f"{self.path.rstrip('/')}/{tail}".lstrip("/"), self.bucket)
        return Location("file", str(Path(self.path, tail)))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.scheme == "s3" else self.path


# The `user:password@` part of a URI (`scheme://user:password@host/...`).
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the `user:password@` part of every URI in it replaced by `***@`, for messages."""
    return _USERINFO.sub("***@", text)


def uri_scheme(uri: str) -> str:
    """The scheme of `uri` ("file" for plain paths); raises ValueError for unknown schemes and for
    an s3:// URI that carries credentials (they belong in the environment, where nothing logs them)."""
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown storage scheme {scheme!r} in {redact(uri)!r}: use a local path or s3://bucket/prefix")
    if scheme == "s3" and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(
            f"{redact(uri)!r} carries credentials before '@': remove them from the URI and set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY in the environment instead"
        )
    return scheme


def scheme_problems(prefix: str, values: dict[str, str | None]) -> list[str]:
    """`"<prefix>.<key>: <why>"` for each set value of `values` whose scheme `uri_scheme` refuses:
    how a config section reports its URIs, every bad one at once."""
    problems = []
    for key, value in values.items():
        if value is not None:
            try:
                uri_scheme(value)
            except ValueError as err:
                problems.append(f"{prefix}.{key}: {err}")
    return problems


def parse(uri: str | os.PathLike) -> Location:
    uri = str(uri)
    scheme = uri_scheme(uri)
    if scheme == "s3":
        rest = uri.split("://", 1)[1]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3 URI {uri!r} has no bucket: use s3://bucket/prefix")
        return Location("s3", key.strip("/"), bucket)
    path = uri.split("://", 1)[1] if uri.startswith("file://") else uri
    return Location("file", os.path.abspath(os.path.expanduser(path)))


def join(uri: str, *parts: str) -> str:
    return str(parse(uri).join(*parts))


def is_s3(uri: str) -> bool:
    return uri_scheme(str(uri)) == "s3"


def s3_client(config=None):
    """A boto3 S3 client for the environment's endpoint and credentials; `config`: a botocore
    `Config` (timeouts, retries)."""
    import boto3

    # boto3 reads AWS_ENDPOINT_URL itself; passing it explicitly keeps older botocore working.
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


def arrow_filesystem(uri: str):
    """A pyarrow filesystem and the path inside it, for streaming reads and writes."""
    import pyarrow.fs as pafs

    loc = parse(uri)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    return pafs.S3FileSystem(**kwargs), f"{loc.bucket}/{loc.path}".rstrip("/")


def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return os.path.exists(loc.path)
    resp = s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.path, MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.path).read_bytes()
    return s3_client().get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()


def write_bytes(uri: str, data: bytes) -> None:
    """Writes atomically on local disk (temp file + rename); S3 puts are atomic already."""
    loc = parse(uri)
    if loc.scheme == "file":
        path = Path(loc.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    s3_client().put_object(Bucket=loc.bucket, Key=loc.path, Body=data)


def delete(uri: str) -> None:
    """Removes one file or object; nothing happens if it is not there."""
    loc = parse(uri)
    if loc.scheme == "file":
        Path(loc.path).unlink(missing_ok=True)
        return
    s3_client().delete_object(Bucket=loc.bucket, Key=loc.path)


def _s3_objects(loc: Location):
    paginator = s3_client().get_paginator("list_objects_v2")
    prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"][len(prefix):], obj


def download_dir(uri: str, cache_root: str | os.PathLike | None = None) -> Path:
    """A local directory with the contents of `uri`. Local URIs are returned as they are; an S3
    prefix is mirrored into `cache_root` (default `$CKD_RAY_CACHE` or ~/.cache/ckd_ray), and files
    whose size and ETag already match are not fetched again."""
    loc = parse(uri)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            raise FileNotFoundError(f"directory {loc.path!r} does not exist")
        return Path(loc.path)
    root = Path(cache_root or os.environ.get("CKD_RAY_CACHE") or Path.home() / ".cache" / "ckd_ray")
    target = root / "s3" / hashlib.sha256(str(loc).encode()).hexdigest()[:16]
    client = s3_client()
    found = False
    for rel, obj in _s3_objects(loc):
        found = True
        if not rel or rel.endswith("/"):
            continue  # a "directory marker" object: nothing to download
        dest = target / rel
        stamp = dest.with_name(f".{dest.name}.etag")
        etag = f"{obj['Size']}:{obj['ETag']}"
        if dest.exists() and stamp.exists() and stamp.read_text() == etag:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(loc.bucket, obj["Key"], str(dest))
        stamp.write_text(etag)
    if not found:
        raise FileNotFoundError(f"no objects under {uri!r}")
    return target


def upload_dir(local_dir: str | os.PathLike, uri: str) -> str:
    """Copies a local directory tree to `uri` (local or S3) and returns `uri`."""
    loc = parse(uri)
    src = Path(local_dir)
    if loc.scheme == "file":
        if Path(loc.path).resolve() != src.resolve():
            shutil.copytree(src, loc.path, dirs_exist_ok=True)
        return uri
    client = s3_client()
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(file), loc.bucket, loc.join(str(file.relative_to(src))).path)
    return uri
