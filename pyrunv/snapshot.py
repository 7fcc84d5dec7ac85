"""Checkpoint and restore: a container's whole VM saved to a directory and resumed from it. QEMU saves
the RAM and the devices (QMP `migrate` to a file), the Rust virtiofsd the open files of the share
(`--migration-mode=find-paths`); no CRIU, and none of its limits. QEMU >= 8.2 and virtiofsd >= 1.11 can
(vm.checkpoint_refusal); elsewhere both verbs refuse in one line and change nothing."""
import dataclasses
import json
import os

from . import plan as plan_mod
from .errors import PyrunvError
from .plan import VmPlan

METADATA = "pyrunv-checkpoint.json"
STATE = "vm.state"
FORMAT = "pyrunv-checkpoint/1"


def _refuse_without_support(what: str, config) -> None:
    from . import vm
    refusal = vm.checkpoint_refusal(config)
    if refusal:
        raise PyrunvError(f"cannot {what}: {refusal}")


def save(container, image_path: str, leave_running: bool, config) -> None:
    """The VM of `container` (a control.Container that owns its VM) into image_path."""
    from . import control
    _refuse_without_support(f"checkpoint {container.id}", config)
    image_path = os.path.abspath(image_path)
    try:
        os.makedirs(image_path, exist_ok=True)
    except OSError as e:
        raise PyrunvError(f"cannot checkpoint {container.id}: {image_path}: {e.strerror}") from None
    reply = control.call(container.vm_dir, "checkpoint", timeout=180, path=os.path.join(image_path, STATE),
                         leave_running=leave_running)
    with open(os.path.join(image_path, METADATA), "w") as f:
        json.dump({"format": FORMAT, "id": container.id, "plan": reply["plan"]}, f)


def load(image_path: str, container_id: str, fresh: VmPlan, config) -> tuple:
    """(the saved VM's plan with this bundle's share and network, its state file) of image_path."""
    image_path = os.path.abspath(image_path)
    try:
        with open(os.path.join(image_path, METADATA)) as f:
            saved = json.load(f)
        if saved.get("format") != FORMAT or not os.path.isfile(os.path.join(image_path, STATE)):
            raise ValueError
        plan = plan_mod.from_json(saved["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PyrunvError(f"{image_path} is not a pyrunv checkpoint") from None
    _refuse_without_support(f"restore {container_id}", config)
    if ([s.name for s in plan.shared] != [s.name for s in fresh.shared] or len(plan.disks) != len(fresh.disks)
            or (plan.network_namespace is None) != (fresh.network_namespace is None)):
        raise PyrunvError(f"cannot restore {container_id}: the bundle's mounts, devices or network are not "
                          "those of the checkpoint's container")
    # The files and the network are this bundle's: the same paths, maybe in another place or on another host.
    plan = dataclasses.replace(plan, shared=fresh.shared, disks=fresh.disks, network_namespace=fresh.network_namespace)
    return plan, os.path.join(image_path, STATE)
