"""The guest RAM of a running QEMU, its memfd: holes punched again after a save, data copied into a
template's file and out of it."""
import os


class GuestRam:
    """The guest RAM of a running QEMU (its memfd), to give back what a save touched. QEMU's save reads
    every page, and the read of a page never written allocates it: all 128 MiB of a 128 MiB guest that had
    used 20. The holes from before the save are punched again after it, while the VM is stopped."""
    def __init__(self, qemu_pid: int):
        self.fd = None
        directory = f"/proc/{qemu_pid}/fd"
        for name in os.listdir(directory):
            if os.readlink(os.path.join(directory, name)).startswith("/memfd:memory-backend-memfd"):
                self.fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC)
                break
        if self.fd is None:
            raise OSError(f"no guest RAM among QEMU's files ({directory})")

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def holes(self) -> list:
        found, offset = [], 0
        for start, end in _data_runs(self.fd, self.size):
            if start > offset:
                found.append((offset, start - offset))
            offset = end
        if offset < self.size:
            found.append((offset, self.size - offset))
        return found

    def save_to(self, fd: int) -> None:
        """Writes the guest's RAM into a file at the same offsets, leaving out the pages that hold only zeros:
        the file is sparse, and as long as the RAM."""
        os.ftruncate(fd, self.size)
        for start, end in _data_runs(self.fd, self.size):
            for offset in range(start, end, COPY_CHUNK):
                chunk = os.pread(self.fd, min(COPY_CHUNK, end - offset), offset)
                for page in range(0, len(chunk), PAGE):
                    if chunk[page:page + PAGE] != ZERO_PAGE:
                        os.pwrite(fd, chunk[page:page + PAGE], offset + page)

    def load_from(self, fd: int) -> None:
        """The RAM save_to wrote, into this guest's RAM, which is still all holes: its holes stay holes."""
        for start, end in _data_runs(fd, self.size):
            for offset in range(start, end, COPY_CHUNK):
                os.pwrite(self.fd, os.pread(fd, min(COPY_CHUNK, end - offset), offset), offset)

    def zero_runs(self) -> list:
        """(offset, length) of every COPY_CHUNK of the RAM that holds only zeros, allocated or not: what a load
        that wrote or checked every page (a migration stream's) allocated for nothing."""
        found = []
        for start, end in _data_runs(self.fd, self.size):
            for offset in range(start - start % COPY_CHUNK, end, COPY_CHUNK):
                if os.pread(self.fd, COPY_CHUNK, offset) == ZERO_CHUNK:
                    found.append((offset, COPY_CHUNK))
        return found

    def punch(self, holes: list) -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for offset, length in holes:
            if libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset),
                              ctypes.c_long(length)) < 0:
                raise OSError(ctypes.get_errno(), "fallocate")

    def close(self) -> None:
        os.close(self.fd)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
COPY_CHUNK = 2 << 20
ZERO_CHUNK = bytes(COPY_CHUNK)


def _data_runs(fd: int, end: int):
    """The (start, end) of each run of data in the file before end, between its holes."""
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole from offset on
            return
        offset = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        if start < end:
            yield start, offset
