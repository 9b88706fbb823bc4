"""lxd-agent: tell the LXD host, through a virtio serial ring-buffer port, that a VM's agent is up.

``lxd_agent.guest`` runs inside the virtual machine and uses the standard library plus
systemd-python only. ``lxd_agent.protocol`` is the vocabulary it shares with the host side,
the separate ``lxd-agent-harness`` distribution (``harness/`` in the source tree), which this
package never imports.
"""

__version__ = "0.2.0"
