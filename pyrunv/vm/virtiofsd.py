"""virtiofsd, the share's file server: QEMU's C one (Debian 12) or the Rust one (Debian 13), each with its own
flags."""
from ..config import Config
from ..errors import PyrunvError
from . import versions
from .daemon import Daemon


def daemon(config: Config, share_dir: str, listen_fd: int, log_path: str) -> Daemon:
    """Either virtiofsd, each with its own flags; both sandbox themselves in namespaces, in the share."""
    found = versions.cached_version(config.virtiofsd) or versions.version(config.virtiofsd)  # the latter says why not
    threads = f"--thread-pool-size={config.share_threads}"
    if versions.is_c_virtiofsd(found):
        if config.share_threads > 1:
            raise PyrunvError(f"share_threads = {config.share_threads} needs the Rust virtiofsd: QEMU's C virtiofsd "
                              "kills its own pool threads (its seccomp filter lacks sched_getaffinity)")
        cache = "none" if config.share_cache == "never" else config.share_cache
        argv = [config.virtiofsd, f"--fd={listen_fd}", "-o", f"source={share_dir}", "-o", f"cache={cache}",
                "-o", "announce_submounts", threads]
    else:
        argv = [config.virtiofsd, f"--fd={listen_fd}", f"--shared-dir={share_dir}", f"--cache={config.share_cache}",
                "--announce-submounts", threads, "--sandbox=namespace"]
        if versions.major_minor(found) >= versions.CHECKPOINT_VIRTIOFSD:
            # Its open files travel with a saved VM, found by their paths. One that is gone at the restore
            # (podman's import makes a fresh rootfs without the mount points) fails only when used, as a
            # file deleted on the host under a running container does.
            argv += ["--migration-mode=find-paths", "--migration-on-error=guest-error"]
    return Daemon("virtiofsd", argv, (listen_fd,), log_path)
