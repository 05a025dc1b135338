"""A slow disk for benchmarks: a blkio (cgroup v1) group that caps reads of the bake's disk.

This machine's virtual disk is cached by the host, so a "cold" read (pages dropped with
posix_fadvise(DONTNEED)) still runs at memory speed. Processes placed in this group read it at
``bps`` bytes/s and ``iops`` requests/s instead, like an HDD or a network volume.
"""

from __future__ import annotations

import os
from pathlib import Path

GROUP = Path("/sys/fs/cgroup/blkio/prebake-bench")


def disk_of(path: Path) -> str | None:
    """MAJ:MIN of the block device holding ``path`` (the whole disk, not a partition)."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysfs.exists():
        return None
    if (sysfs / "partition").exists():
        sysfs = sysfs.resolve().parent
    return (sysfs / "dev").read_text().strip()


def make(path: Path, bps: int, iops: int = 0) -> Path | None:
    """Creates the group throttling reads of ``path``'s disk; None where this machine cannot."""
    disk = disk_of(path)
    if disk is None or not GROUP.parent.exists():
        return None
    try:
        GROUP.mkdir(exist_ok=True)
        (GROUP / "blkio.throttle.read_bps_device").write_text(f"{disk} {bps}\n")
        if iops:
            (GROUP / "blkio.throttle.read_iops_device").write_text(f"{disk} {iops}\n")
    except OSError:
        return None
    return GROUP


class readahead:
    """Sets the disk's ``read_ahead_kb`` for a block of code (root only), restoring it after."""

    def __init__(self, path: Path, kb: int):
        disk = disk_of(path)
        self.file = Path(f"/sys/dev/block/{disk}/queue/read_ahead_kb") if disk else None
        self.kb, self.old = kb, None

    def __enter__(self) -> bool:
        try:
            self.old = self.file.read_text().strip()
            self.file.write_text(str(self.kb))
            return True
        except (OSError, AttributeError):
            return False

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            self.file.write_text(self.old)


def enter_code(group: Path | None) -> str:
    """Python source that moves the running process into ``group`` (nothing if None)."""
    if group is None:
        return ""
    return f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
