"""lxd-agent: tell the LXD host, through a virtio serial ring-buffer port, that a VM's agent is up.

``lxd_agent.guest`` runs inside the virtual machine and uses the standard library plus
systemd-python only. ``lxd_agent.host`` runs on the host (QEMU, QMP, image builds) and is
never imported by the guest. ``lxd_agent.protocol`` is the vocabulary both sides share.
"""

__version__ = "0.2.0"
