"""Mount propagation's bookkeeping: which guest mount becomes which bind in the share, and when it goes."""
import pytest

from pyrunv.monitor import propagation

RECORDS = b"root=app/rootfs\0mount=1000\t104000\tbind\tapp/m1\t/data\t\0mount=0\t0\tproc\tproc\t/proc\t\0"
MADE = ("47 29 0:27 / / rw - virtiofs none rw\n"
        "48 47 0:28 / /proc rw - proc proc rw\n"
        "55 47 0:32 / /data rw shared:1 - virtiofs none rw\n")
ETC_AT_DATA = "60 55 0:27 /etc /data/etc rw shared:2 - virtiofs none rw\n"
TMPFS_AT_DATA = "61 55 0:40 / /data/tmp rw shared:3 - tmpfs none rw\n"
ETC_AT_MNT = "62 47 0:27 /etc /mnt rw - virtiofs none rw\n"


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(propagation.mounts, "mount", lambda source, target, fstype, flags: made.append(
        ("mount", source, target)))
    monkeypatch.setattr(propagation.mounts, "unmount", lambda target: made.append(("unmount", target)))
    return made


@pytest.fixture
def mirror():
    mirror = propagation.Propagation("/state/share")
    mirror.expect(7, RECORDS)
    mirror.report(7, MADE)
    return mirror


def test_what_the_container_was_made_with_is_not_mounted_again(calls, mirror):
    mirror.report(7, MADE)
    assert calls == []


def test_a_bind_under_a_shared_mount_is_bound_in_the_share_and_unbound_with_it(calls, mirror):
    mirror.report(7, MADE + ETC_AT_DATA)
    assert calls == [("mount", "/state/share/app/rootfs/etc", "/state/share/app/m1/etc")]
    mirror.report(7, MADE + ETC_AT_DATA)  # the same again: nothing new
    mirror.report(7, MADE)
    assert calls[1:] == [("unmount", "/state/share/app/m1/etc")]


def test_a_mount_of_what_the_host_does_not_have_or_outside_shared_mounts_stays_in_the_guest(calls, mirror):
    mirror.report(7, MADE + TMPFS_AT_DATA + ETC_AT_MNT)
    mirror.report(7, MADE)
    assert calls == []


def test_paths_with_spaces_are_unescaped_and_an_unknown_container_is_ignored(calls, mirror):
    mirror.report(7, MADE + "63 55 0:27 /my\\040dir /data/my\\040dir rw - virtiofs none rw\n")
    mirror.report(8, MADE + ETC_AT_DATA)
    assert calls == [("mount", "/state/share/app/rootfs/my dir", "/state/share/app/m1/my dir")]
