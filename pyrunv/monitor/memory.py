"""The guest's RAM as `update` sets it. QEMU holds the VM's maximum from its boot; the guest's kernel uses what
it booted with, the agent adds the rest in blocks when a limit needs it, and the balloon holds whatever is
above the target, given back to the host."""
import asyncio
import time

from ..vm import plan as plan_mod
from .channel import F

MIB = 1 << 20
BALLOON_TIMEOUT = 10.0
ADD_TIMEOUT = 30.0  # the agent adds a block in milliseconds; under TCG on a busy host, more


class GuestMemory:
    def __init__(self, service):
        self.service = service
        self.booted = service.plan.memory_mib * MIB
        self.ram = plan_mod.ram_mib(service.plan) * MIB
        self.added = 0  # by the agent, since the boot
        self.target = self.booted
        self.pending = False  # set while the VM was frozen: applied when it thaws

    async def set(self, mib: int) -> None:
        self.target = mib * MIB
        if self.service.paused:
            self.pending = True
        else:
            await self._apply()

    async def at_least(self, mib: int) -> None:
        if mib * MIB > self.target:
            await self.set(mib)

    async def thawed(self) -> None:
        if self.pending:
            self.pending = False
            await self._apply()

    async def _apply(self) -> None:
        if self.target - self.booted > self.added:
            wanted = str(self.target - self.booted).encode()
            reply = await asyncio.wait_for(self.service.channel.request(F.MEMORY, None, wanted), ADD_TIMEOUT)
            self.added = int(reply)
        await self._balloon(self.ram - (self.booted + self.added - self.target))

    async def _balloon(self, value: int) -> None:
        """QEMU's balloon target is the VM's RAM less the balloon: a running guest is given BALLOON_TIMEOUT to
        get there, either way, so that what `update` promised is there when it returns."""
        qmp = await self.service.qmp_client()
        await qmp.execute("balloon", {"value": value})
        deadline = time.monotonic() + BALLOON_TIMEOUT
        while not self.service.paused and time.monotonic() < deadline:
            if abs((await qmp.execute("query-balloon"))["actual"] - value) < MIB:
                return
            await asyncio.sleep(0.05)
