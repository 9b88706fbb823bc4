"""One QEMU process: starting it, its QMP connection and events, saved states, disk overlays.

Knows nothing of LXD (that is `lxd`) or of a guest's boot (that is `vm`).
"""
