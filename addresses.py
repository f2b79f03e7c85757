"""
Where a screen's files are: local paths, or any URL fsspec reads (s3://, gs://, https://, ...).

The Cell Painting Gallery (JUMP-CP) is a public S3 bucket whose LoadData CSVs name their images and
illumination functions by s3:// address; prepare reads them there, or from a local mirror
(`--mirror s3://cellpainting-gallery=/data/cpg`). S3 is read anonymously unless credentials are in
the environment, at the endpoint the standard AWS variables name (AWS_ENDPOINT_URL_S3, as boto3 and
s3fs read it: a private mirror or a local server needs no flag), with retries on transient errors.
fsspec (and s3fs for s3://) are optional: only URLs need them.
"""

import functools
import os
from pathlib import Path

RETRIES = {"max_attempts": 8, "mode": "adaptive"}  # botocore's: throttling and 5xx answers, dropped connections


class MissingObject(Exception):
    """An address that names nothing, or whose server refused the request; the message says which."""


def is_url(address):
    return "://" in str(address)


def join(folder, name):
    """folder/name, for a local folder or a URL (a URL's // survives, which Path would fold)."""
    if is_url(folder):
        return f"{str(folder).rstrip('/')}/{name}"
    return str(Path(folder) / name)


def with_mirrors(address, mirrors):
    """The address read from a local mirror where one covers it: mirrors is [(prefix, folder)]."""
    for prefix, folder in mirrors:
        if str(address).startswith(prefix):
            return str(Path(folder) / str(address)[len(prefix):].lstrip("/"))
    return str(address)


def filesystem(protocol):
    return filesystem_of_process(protocol, os.getpid())


@functools.lru_cache(maxsize=None)
def filesystem_of_process(protocol, pid):
    """One per process: s3fs's event loop does not survive the fork of prepare's workers."""
    try:
        import fsspec
    except ImportError:
        raise SystemExit(f"reading {protocol}:// addresses needs fsspec: pip install fsspec"
                         + (" s3fs" if protocol.startswith("s3") else "")) from None
    if protocol.startswith("s3"):
        credentials = any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"))
        try:
            return fsspec.filesystem("s3", anon=not credentials, config_kwargs={"retries": RETRIES}, skip_instance_cache=True)
        except ImportError:
            raise SystemExit("reading s3:// addresses needs s3fs: pip install s3fs") from None
    return fsspec.filesystem(protocol, skip_instance_cache=True)


def missing(address, error):
    """An fsspec error as one line naming the object."""
    if isinstance(error, FileNotFoundError):
        return MissingObject(f"{address}: no such object")
    if isinstance(error, PermissionError):
        return MissingObject(f"{address}: the server refused the request ({error}); private data needs credentials "
                             "in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE)")
    return MissingObject(f"{address}: cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def read_bytes(address):
    """The whole file at a local path or a URL."""
    if not is_url(address):
        return Path(address).read_bytes()
    try:
        return filesystem(str(address).split("://")[0]).cat_file(str(address))
    except (OSError, ValueError) as e:  # FileNotFoundError, PermissionError, botocore's errors as OSError
        raise missing(address, e) from None


def open_binary(address):
    """A file object for ranged reads (a TIFF's header without the pixels)."""
    if not is_url(address):
        return open(address, "rb")
    try:
        return filesystem(str(address).split("://")[0]).open(str(address), "rb")
    except (OSError, ValueError) as e:
        raise missing(address, e) from None
