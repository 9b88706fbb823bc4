"""One guest under QEMU: its configuration and command line, firmware, serial console,
acceleration (and the KVM probe), the machine-wide VM lock, and the running `Vm`.

Builds no images (that is `image`) and holds no scenario (that is `scenarios`).
"""
