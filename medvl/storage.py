"""Every input and output of medvl is a URI: a plain path, ``file://...`` or ``s3://...``.

All I/O goes through one pyarrow filesystem per URI, so Ray Data, the training
checkpoints and our own small files share a single code path. For S3 the endpoint comes
from the standard ``AWS_ENDPOINT_URL`` (MinIO, a loopback test server, or unset for AWS)
and credentials from the standard AWS variables, exactly as boto3 would read them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(filesystem, path inside it)``."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """Relative local paths made absolute, so Ray workers (other working dirs) find them."""
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    if is_s3(uri) or uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


# Filesystems one mount of which every node can share (``fuse.*`` ones by name: a local
# fuse-overlayfs is a fuse filesystem too).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs",
                       "fuse.s3fs", "fuse.mountpoint-s3", "fuse.gcsfuse", "fuse.juicefs", "fuse.goofys",
                       "fuse.rclone", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.sshfs"}


def mount_type(path: str, mounts: str = "/proc/self/mounts") -> str:
    """The filesystem type of the mount holding local ``path`` (its longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    with open(mounts) as f:
        for line in f:
            _, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below a directory URI (recursive), as URIs with the same scheme, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rels = sorted(
        posixpath.relpath(i.path, path)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [join(uri, r) for r in rels]


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(uri: str) -> None:
    """Delete a file if it exists."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


NODE_CACHE = os.path.join(tempfile.gettempdir(), "medvl-cache")


@contextlib.contextmanager
def local_dir(uri: str, weights: bool = True) -> Iterator[str]:
    """A local directory holding ``uri``'s files (``weights=False``: all but weight files, for
    a tokenizer or a config from a model directory) while the block runs.

    Models and tokenizers load from local directories only. An ``s3://`` directory is
    fetched once per node into a shared cache (the 8 workers of a GPU node use one copy
    instead of pulling 8 x 26 GB for a 13B model) and deleted by the last process to
    leave the block: while a process is inside, it holds a shared lock on the entry, and
    only a process that gets the lock exclusively may delete it.
    """
    if not is_s3(uri):
        yield resolve(uri)[1]
        return
    import fcntl
    import hashlib

    os.makedirs(NODE_CACHE, exist_ok=True)
    key = uri if weights else f"{uri} without weights"
    entry = os.path.join(NODE_CACHE, hashlib.sha256(key.encode()).hexdigest()[:16])
    with open(entry + ".use", "a") as use, open(entry + ".fetch", "a") as fetch:
        fcntl.flock(use, fcntl.LOCK_SH)  # waits while a last user deletes the entry
        fcntl.flock(fetch, fcntl.LOCK_EX)  # one process downloads, the others wait for it
        if not os.path.isdir(entry):
            partial = tempfile.mkdtemp(dir=NODE_CACHE)
            copy_dir(uri, partial, skip=() if weights else WEIGHT_SUFFIXES)
            os.rename(partial, entry)
        fcntl.flock(fetch, fcntl.LOCK_UN)
        try:
            yield entry
        finally:
            fcntl.flock(use, fcntl.LOCK_UN)
            _delete_if_unused(use, entry)


def _delete_if_unused(use, entry: str) -> None:
    """Delete a cache entry unless another process holds it (the last one out deletes it)."""
    import fcntl
    import shutil

    try:
        fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    shutil.rmtree(entry, ignore_errors=True)
    fcntl.flock(use, fcntl.LOCK_UN)


def upload_file(local_path: str, uri: str) -> None:
    """Copy one local file to a URI (a no-op when it is already that file)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local_path) == path:
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def fetched(fs: pafs.FileSystem, path: str, keep: Callable[[str], bool]) -> Iterator[tuple[str, int]]:
    """A local directory holding the files below ``path`` on ``fs`` whose relative path
    ``keep`` accepts, and the bytes fetched for it, while the block runs: ``path`` itself on a
    local (or mounted) disk, where nothing needs fetching; else a temporary copy of those files."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield path, 0
        return
    with tempfile.TemporaryDirectory(prefix="medvl-fetch-") as local:
        yield local, copy_files(fs, path, pafs.LocalFileSystem(), local, keep)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def copy_dir(src: str, dst: str, skip: tuple[str, ...] = ()) -> None:
    """Copy a directory between any two URIs (local <-> S3 included), replacing ``dst``;
    files whose names end with one of ``skip`` are left out."""
    delete_dir(dst)
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    if not skip:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return
    copy_files(src_fs, src_path, dst_fs, dst_path, lambda rel: not rel.endswith(skip))


def copy_files(src_fs: pafs.FileSystem, src_path: str, dst_fs: pafs.FileSystem, dst_path: str,
               keep: Callable[[str], bool]) -> int:
    """Copy the files below ``src_path`` whose path relative to it ``keep`` accepts to the same
    places below ``dst_path``; return the bytes copied (what a reader fetched from storage)."""
    copied = 0
    for info in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        rel = posixpath.relpath(info.path, src_path)
        if info.type != pafs.FileType.File or not keep(rel):
            continue
        target = f"{dst_path}/{rel}"
        dst_fs.create_dir(posixpath.dirname(target), recursive=True)
        pafs.copy_files(info.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
        copied += info.size
    return copied


def stamp(uri: str) -> list[int]:
    """(size, mtime in ns) of a file: a cheap fingerprint of a raw input for re-run checks."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return [info.size, info.mtime_ns or 0]
