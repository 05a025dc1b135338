"""Which filesystem a bake sits on: a network or FUSE one makes ``mode="auto"`` load eagerly.

Apart from the staged reader so that a mapped load (the common case) checks it without
importing the reader and its thread pool.
"""

from __future__ import annotations

import os
from pathlib import Path

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "9p", "gpfs",
                       "beegfs", "wekafs", "virtiofs", "fuse.")  # fuse.*: s3fs, gcsfuse, sshfs, ...


def network_filesystem(path: Path) -> str | None:
    """The filesystem type of ``path`` when it is a network or FUSE one (``/proc/self/mountinfo``),
    where maps turn into small random reads and a file changed under a map kills the process."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = os.path.realpath(path), "", None
    for line in lines:
        fields = line.split(" - ")
        if len(fields) != 2:
            continue
        mount, fstype = fields[0].split()[4], fields[1].split()[0]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind if kind and kind.startswith(NETWORK_FILESYSTEMS) else None
