"""pyrunv: a runc-compatible OCI runtime whose containers are QEMU virtual machines."""
__version__ = "0.1.0"
