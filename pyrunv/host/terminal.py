"""The host's side of a container's terminal: a pty for --console-socket, or the person's own terminal."""
import contextlib
import os
import socket
import termios
import tty

from ..errors import PyrunvError


@contextlib.contextmanager
def raw_terminal(fd: int):
    """The guest's tty does the line discipline; the host terminal passes keys through untouched."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def open_console(console_socket: str, size: tuple | None) -> int:
    """Like runc: a pty whose master goes to --console-socket. Returns the slave, in raw mode
    because the guest's own tty does the line discipline."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        if size and all(size):
            termios.tcsetwinsize(slave, size)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as e:
        os.close(slave)
        raise PyrunvError(f"console socket {console_socket}: {e.strerror}") from None
    finally:
        os.close(master)
    return slave
