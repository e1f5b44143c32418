"""How a write becomes visible all at once on each kind of fsspec filesystem.

Two write operations cover the store; nothing is ever overwritten with different bytes:
    put_blob(local, dest)     content-addressed, so writing it twice is harmless (idempotent replace); a
                              build's own staging file is hard-linked into a local store on its filesystem
    create_bytes(data, dest)  write-once (manifests, eval records): False, not an error, when dest exists

local disk   a temporary name under <root>/tmp, then os.replace (atomic); write-once through os.link, which
             fails if the name exists, so two racing publishers of one artifact leave exactly one manifest.
object store (s3, gcs, azure) there is no rename (mv = copy + delete) but a single PUT, and a multipart upload
             on completion, is atomic: write straight to the final key. Write-once is a conditional PUT
             (If-None-Match: *, fsspec mode="create"); the loser gets a 412 (FileExistsError). A server without
             conditional PUT falls back to check-then-put: two identical publishes may then both write, the
             last PUT wins, and both bodies describe the same artifact (same id = same key), so the entry is
             still one valid manifest.
other        (memory, sftp, ...) temporary name then fs.mv; write-once as check-then-move.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import uuid
from pathlib import Path

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


def protocols(fs) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def is_local(fs) -> bool:
    return bool(protocols(fs) & {"file", "local"})


def is_object_store(fs) -> bool:
    return bool(protocols(fs) & OBJECT_STORES)


def mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict; None when the backend gives none."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
        try:
            return dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


class Writer:
    def __init__(self, fs, root: str):
        self.fs = fs
        self.tmp_dir = f"{root}/tmp"
        self.local = is_local(fs)
        self.object_store = is_object_store(fs)

    def _tmp(self) -> str:
        return f"{self.tmp_dir}/{uuid.uuid4().hex}"

    def _parent(self, dest: str) -> None:
        if not self.object_store:
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)

    def put_blob(self, local: Path, dest: str, link: bool = False) -> None:
        """`link`: local's bytes are the caller's to give away (a build's staging file, deleted after the
        publish and never written again): a local store takes them by hard link when it is on the same
        filesystem, with no copy. The link lands under tmp/ and is renamed into place like a copy."""
        if self.object_store:
            self.fs.put_file(str(local), dest)
            return
        self._parent(dest)
        if self.local:
            os.makedirs(self.tmp_dir, exist_ok=True)
            tmp = self._tmp()
            if not (link and _hard_link(local, tmp)):
                shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
            return
        tmp = self._tmp()
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, dest)

    def create_bytes(self, data: bytes, dest: str) -> bool:
        """Write dest only if it does not exist; True if this call created it."""
        if self.object_store:
            try:
                self.fs.pipe_file(dest, data, mode="create")
                return True
            except FileExistsError:
                return False
            except (NotImplementedError, TypeError):  # this fsspec back-end has no mode="create"
                pass
            except OSError as e:  # the server has no conditional PUT (501 NotImplemented)
                if "NotImplemented" not in str(e) and "not implemented" not in str(e).lower():
                    raise
            if self.fs.exists(dest):  # write-once check (see the module doc for the race it leaves)
                return False
            self.fs.pipe_file(dest, data)
            return True
        self._parent(dest)
        if self.local:
            os.makedirs(self.tmp_dir, exist_ok=True)
            tmp = self._tmp()
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, dest)  # atomic create-if-absent; a reader never sees a partial manifest
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: check, then rename
                if os.path.exists(dest):
                    return False
                os.replace(tmp, dest)
                return True
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if self.fs.exists(dest):
            return False
        tmp = self._tmp()
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, dest)
        return True

    def touch(self, dest: str) -> None:
        """Refresh a reused blob's age so `gc` treats it like a fresh upload (local disks; cheap there)."""
        if self.local:
            try:
                os.utime(dest)
            except OSError:
                pass


def _hard_link(src: Path, dest: str) -> bool:
    """False where there is no hard link to be had (another filesystem, or one without links): copy then.
    Only a plain file with no other name is taken: a symlink, or a file also linked from elsewhere (a source
    checkpoint, a cache), could later be changed in place under its other name, and the blob with it."""
    try:
        st = os.lstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        os.link(src, dest, follow_symlinks=False)
        return True
    except OSError:
        return False
