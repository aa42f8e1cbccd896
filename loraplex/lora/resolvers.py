"""Finding adapters that are not registered: resolvers by URI scheme, tried in order.

A request may name an adapter the engine has never seen; with ``lora_resolvers`` set, the engine asks each
resolver for a local folder holding it, then reads, validates and registers it like any other:

* a folder path (or ``file://`` URI): ``<folder>/<name>``, which must resolve inside the folder;
* ``s3://bucket/prefix``: the objects under ``prefix/<name>/`` (any S3-compatible endpoint: boto3 reads
  ``AWS_ENDPOINT_URL`` and the usual credentials), downloaded into the local disk cache;
* ``hf://``: the Hugging Face Hub repository named ``<name>`` (``org/adapter``), through ``huggingface_hub``'s
  cache (``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` apply).

boto3 and huggingface_hub are imported only when a resolver of theirs is used. A resolver answers None when
it does not have the adapter; an error (network, permissions) stops the search with that error.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

from loraplex.errors import AdapterError
from loraplex.lora.adapter import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE

# what is fetched from remote stores: the adapter and, for adapters that add tokens, its tokenizer
_FILES = (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)


class Resolver(Protocol):
    uri: str

    def fetch(self, name: str) -> Optional[str]:
        """A local folder holding adapter ``name``, or None when this resolver does not have it."""


def _segments(name: str) -> list[str]:
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise AdapterError(f"adapter name {name!r}: empty, '.' or '..' path segments cannot be resolved")
    return parts


class FolderResolver:
    def __init__(self, root: str) -> None:
        self.uri = root
        self.root = os.path.realpath(root[len("file://"):] if root.startswith("file://") else root)

    def fetch(self, name: str) -> Optional[str]:
        path = os.path.realpath(os.path.join(self.root, *_segments(name)))
        if os.path.commonpath([self.root, path]) != self.root:
            raise AdapterError(f"adapter {name!r} resolves outside the resolver folder {self.uri!r}")
        return path if os.path.isfile(os.path.join(path, "adapter_config.json")) else None


class S3Resolver:
    def __init__(self, uri: str, cache_dir: str) -> None:
        self.uri = uri
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"lora resolver {uri!r}: no bucket (s3://bucket/prefix)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = os.path.join(cache_dir, "s3", bucket, *([self.prefix] if self.prefix else []))
        self._client = None

    def fetch(self, name: str) -> Optional[str]:
        parts = _segments(name)
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")
        key_prefix = "/".join([p for p in [self.prefix, *parts] if p]) + "/"
        listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=key_prefix)
        keys = [o["Key"] for o in listed.get("Contents", []) if o["Key"][len(key_prefix):] in _FILES]
        if not any(k.endswith("adapter_config.json") for k in keys):
            return None
        local = os.path.join(self.cache, *parts)
        os.makedirs(local, exist_ok=True)
        for key in keys:  # downloaded beside, then moved into place: a reader never sees half a file
            dest = os.path.join(local, key[len(key_prefix):])
            self._client.download_file(self.bucket, key, dest + ".part")
            os.replace(dest + ".part", dest)
        return local


class HubResolver:
    def __init__(self, uri: str, cache_dir: Optional[str]) -> None:
        self.uri = uri
        self.cache_dir = cache_dir

    def fetch(self, name: str) -> Optional[str]:
        _segments(name)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return snapshot_download(repo_id=name, allow_patterns=list(_FILES), cache_dir=self.cache_dir)
        except (RepositoryNotFoundError, LocalEntryNotFoundError):
            return None


def make_resolvers(spec: Optional[str], cache_dir: Optional[str]) -> list[Resolver]:
    """Resolvers for ``spec``, a comma-separated list of URIs (a folder, ``s3://bucket/prefix``, ``hf://``)."""
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "loraplex", "adapters")
    out: list[Resolver] = []
    for uri in [u.strip() for u in (spec or "").split(",") if u.strip()]:
        if uri.startswith("s3://"):
            out.append(S3Resolver(uri, cache))
        elif uri.startswith("hf://"):
            out.append(HubResolver(uri, cache_dir))
        elif "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"lora resolver {uri!r}: unknown scheme (a folder, file://, s3:// or hf://)")
        else:
            out.append(FolderResolver(uri))
    return out
