"""A volume that freezes for real: a small ext4 file system on a loop device, `fsfreeze`d.

While frozen, a write to it waits inside the kernel in uninterruptible sleep (D state,
`percpu_rwsem_wait`) and not even SIGKILL ends the writer until the volume is thawed:
what a stalled EFS hard mount does to a process, without NFS or FUSE.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .support import binary, require_binaries, require_root

IMAGE_BYTES = 16 << 20


class FrozenVolume:
    """A mounted loop file system; `frozen()` freezes it for the block, thawed whatever happens."""

    def __init__(self, base: Path) -> None:
        self.image = base / "volume.img"
        self.mount = base / "mnt"
        self.is_frozen = False

    @classmethod
    def start(cls, base: Path) -> FrozenVolume:
        require_binaries("mkfs.ext4", "fsfreeze", "mount", "umount")
        require_root("mount and freeze a loop file system")
        volume = cls(base)
        with volume.image.open("wb") as fh:
            fh.truncate(IMAGE_BYTES)
        # No `timeout=`: subprocess polls with time.sleep then, which libfaketime (the
        # suite's run a year ahead) breaks; these local commands return in milliseconds.
        subprocess.run([binary("mkfs.ext4"), "-q", "-F", str(volume.image)], check=True,
                       capture_output=True)
        volume.mount.mkdir()
        try:
            subprocess.run([binary("mount"), "-o", "loop", str(volume.image),
                            str(volume.mount)], check=True, capture_output=True)
        except BaseException:
            volume.stop()  # never leave a mount behind
            raise
        return volume

    def freeze(self) -> None:
        self.is_frozen = True  # before: a failure half-way is still thawed at the end
        subprocess.run([binary("fsfreeze"), "--freeze", str(self.mount)], check=True,
                       capture_output=True)

    def thaw(self) -> None:
        if self.is_frozen:
            self.is_frozen = False
            subprocess.run([binary("fsfreeze"), "--unfreeze", str(self.mount)], check=False,
                           capture_output=True)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def stop(self) -> None:
        self.thaw()
        # Lazily: a writer that was stuck may take a moment to let go after the thaw.
        subprocess.run([binary("umount"), "--lazy", str(self.mount)], check=False,
                       capture_output=True)


def stuck_in_kernel(pid: int) -> bool:
    """True while any thread of `pid` is in uninterruptible sleep (D state)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                return True
    return False
