"""The guest channel against a fake agent on a socketpair: replies, stdio relay, flow control, a dying VM."""
import asyncio
import concurrent.futures
import fcntl
import os
import socket

import pytest

from pyrunv.monitor.channel import EXIT, HEADER, PAIR, WINDOW, Channel, ChannelClosed, F, ProcessIO
from pyrunv.errors import PyrunvError

PROC = 5  # the id of the guest process in these tests


class FakeAgent:
    """The guest's end of the channel, speaking kernel/agent/protocol.h."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def send(self, kind: F, ident: int, payload: bytes = b"") -> None:
        self.writer.write(HEADER.pack(kind, ident, len(payload)) + payload)

    async def receive(self) -> tuple:
        kind, ident, length = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return kind, ident, await self.reader.readexactly(length)

    async def credits(self, count: int) -> list:
        """The next `count` frames, which must all be CREDIT frames for PROC, as (stream, bytes)."""
        frames = [await self.receive() for _ in range(count)]
        assert all(kind == F.CREDIT and ident == PROC for kind, ident, _ in frames), frames
        return [PAIR.unpack(payload) for _, _, payload in frames]

    def exit(self, code: int, signal: int = 0, oom_kills: int = 0) -> None:
        """What the agent sends when a process ends: the end of both outputs, then the status."""
        self.send(F.STDOUT, PROC)
        self.send(F.STDERR, PROC)
        self.send(F.EXIT, PROC, EXIT.pack(code, signal, oom_kills))


@pytest.fixture
def executor():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture
def pipe():
    """A pipe big enough to take every test's output without a reader: (read end, write end)."""
    ends = os.pipe()
    fcntl.fcntl(ends[1], fcntl.F_SETPIPE_SZ, 1 << 20)
    yield ends
    for fd in ends:
        try:
            os.close(fd)
        except OSError:
            pass  # closed by the test


def run(scenario) -> None:
    """Runs `await scenario(channel, agent)` with the channel open and the fake agent at its other end."""
    async def main():
        host, guest = socket.socketpair()
        channel = Channel(host)
        await channel.open()
        agent = FakeAgent(*await asyncio.open_connection(sock=guest))
        try:
            await asyncio.wait_for(scenario(channel, agent), 10)
        finally:
            agent.writer.close()
    asyncio.run(main())


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4 << 20)
    except BlockingIOError:
        return b""


def test_ready_carries_the_agents_version():
    async def scenario(channel, agent):
        agent.send(F.READY, 0, b"pyrunv-agent/1")
        assert await channel.ready == "pyrunv-agent/1"
    run(scenario)


def test_stdout_and_stderr_are_written_out_and_credited_back(executor, pipe):
    err_pipe = os.pipe()

    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], err_pipe[1]), executor)
        proc.start_relay()
        agent.send(F.READY, 0, b"pyrunv-agent/1")
        agent.send(F.STDOUT, PROC, b"hello ")
        agent.send(F.STDOUT, PROC, b"world")
        agent.send(F.STDERR, PROC, b"oops")
        credits = await agent.credits(3)
        assert sorted(credits) == [(1, 5), (1, 6), (2, 4)]
        assert [c for c in credits if c[0] == 1] == [(1, 6), (1, 5)], "stdout is credited in order"
        assert read_available(pipe[0]) == b"hello world"
        assert read_available(err_pipe[0]) == b"oops"
        agent.exit(0)
        assert await proc.wait() == (0, 0)
    try:
        run(scenario)
    finally:
        os.close(err_pipe[0])
        os.close(err_pipe[1])


def test_wait_returns_the_exit_status_only_after_all_output_was_written(executor, pipe):
    chunks = [bytes([n]) * 8192 for n in range(32)]

    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor)
        proc.start_relay()
        for chunk in chunks:
            agent.send(F.STDOUT, PROC, chunk)
        agent.exit(3, 0)
        assert await proc.wait() == (3, 0)
        assert read_available(pipe[0]) == b"".join(chunks)
        assert await agent.credits(len(chunks)) == [(1, 8192)] * len(chunks)
    run(scenario)


def test_the_end_of_output_alone_does_not_end_the_wait(executor, pipe):
    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor)
        proc.start_relay()
        agent.send(F.STDOUT, PROC)
        agent.send(F.STDERR, PROC)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.2)
        agent.send(F.EXIT, PROC, EXIT.pack(128 + 15, 15, 0))
        assert await proc.wait() == (143, 15)
    run(scenario)


@pytest.mark.parametrize("payload, oom_kills", [(EXIT.pack(137, 9, 2), 2), (EXIT.pack(137, 9, 2)[:8], 0)],
                         ids=["with the count", "an older agent's, without"])
def test_an_exit_carries_the_oom_kills_of_a_containers_init(executor, pipe, payload, oom_kills):
    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor)
        proc.start_relay()
        agent.send(F.STDOUT, PROC)
        agent.send(F.STDERR, PROC)
        agent.send(F.EXIT, PROC, payload)
        assert await proc.wait() == (137, 9)
        assert proc.oom_kills == oom_kills
    run(scenario)


def test_output_nobody_reads_is_still_credited_so_the_guest_never_stalls(executor, pipe):
    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor)
        proc.start_relay()
        os.close(pipe[0])  # the engine closed its end
        agent.send(F.STDOUT, PROC, b"lost")
        agent.send(F.STDOUT, PROC, b"also lost")
        agent.send(F.STDERR, PROC, b"no stderr fd")
        assert sorted(await agent.credits(3)) == [(1, 4), (1, 9), (2, 12)]
        agent.exit(1)
        assert await proc.wait() == (1, 0)
    run(scenario)


def test_a_relay_without_stderr_ends_with_stdouts_eof_and_the_exit(executor, pipe):
    async def scenario(channel, agent):  # a port-forward's connection: one stream back
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor, stderr=False)
        proc.start_relay()
        agent.send(F.STDOUT, PROC, b"reply")
        agent.send(F.STDOUT, PROC, b"")
        agent.exit(0)
        assert await asyncio.wait_for(proc.wait(), 5) == (0, 0)
        assert os.read(pipe[0], 100) == b"reply"
    run(scenario)


def test_stdin_is_sent_within_the_credit_the_agent_grants(executor, pipe):
    data = os.urandom(WINDOW + 1000)

    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (pipe[0], None, None), executor)
        proc.start_relay()
        os.write(pipe[1], data)
        received = b""
        while len(received) < WINDOW:
            kind, ident, payload = await agent.receive()
            assert (kind, ident) == (F.STDIN, PROC) and payload
            received += payload
        assert received == data[:WINDOW]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(agent.receive(), 0.2)  # the window is used up
        agent.send(F.CREDIT, PROC, PAIR.pack(0, 600))
        assert await agent.receive() == (F.STDIN, PROC, data[WINDOW:WINDOW + 600])
        agent.send(F.CREDIT, PROC, PAIR.pack(0, 1 << 20))
        os.close(pipe[1])
        rest = b""
        while True:
            kind, ident, payload = await agent.receive()
            assert (kind, ident) == (F.STDIN, PROC)
            if not payload:
                break  # an empty STDIN frame is the end of input
            rest += payload
        assert rest == data[WINDOW + 600:]
        agent.exit(0)
        await proc.wait()
    run(scenario)


def test_replies_resolve_requests():
    async def scenario(channel, agent):
        started = asyncio.ensure_future(channel.request(F.START, 1))
        listing = asyncio.ensure_future(channel.request(F.PS))
        start_frame, ps_frame = await agent.receive(), await agent.receive()
        assert start_frame == (F.START, 1, b"") and ps_frame[0] == F.PS
        agent.send(F.REPLY, ps_frame[1], b"1 0 0 sh\n")  # answered out of order
        agent.send(F.OK, 1)
        assert await listing == b"1 0 0 sh\n"
        assert await started == b""
    run(scenario)


def test_an_error_reply_raises_the_agents_message():
    async def scenario(channel, agent):
        request = asyncio.ensure_future(channel.request(F.EXEC, 7, b"arg=/nope\0"))
        assert await agent.receive() == (F.EXEC, 7, b"arg=/nope\0")
        agent.send(F.ERROR, 7, b"exec /nope: No such file or directory")
        with pytest.raises(PyrunvError) as refused:
            await request
        assert str(refused.value) == "exec /nope: No such file or directory"
    run(scenario)


def test_a_vanished_agent_fails_requests_and_ends_processes_as_killed(executor, pipe):
    async def scenario(channel, agent):
        proc = ProcessIO(channel, PROC, (None, pipe[1], None), executor)
        proc.start_relay()
        request = asyncio.ensure_future(channel.request(F.STATS))
        assert (await agent.receive())[0] == F.STATS
        agent.send(F.STDOUT, PROC, b"last words")
        agent.writer.close()  # after flushing what was sent
        with pytest.raises(ChannelClosed, match="^the VM's agent is gone$"):
            await request
        assert await proc.wait() == (137, 9)
        assert read_available(pipe[0]) == b"last words"
        assert channel.closed.done()
        with pytest.raises(ChannelClosed):
            await channel.request(F.PS)
    run(scenario)
