"""What every verb gets from the global flags: the state store and the cgroup form."""
import click

from ..state import store as state


class Context:
    def __init__(self, root: str, systemd_cgroup: bool):
        self.store = state.Store(root)
        self.systemd_cgroup = systemd_cgroup

    def container(self, container_id: str):
        from ..runtime.container import Container
        return Container.load(self.store, container_id)


pass_ctx = click.make_pass_decorator(Context)
