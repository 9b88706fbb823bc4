"""lxd-agent-harness: boot guests under QEMU with LXD's and Incus's ring-buffer layouts, and prove
what their hosts see of the agent inside.

Layers, lowest first; a module imports only from its own layer or those below
(tests/harness/test_layers.py checks it):

- `base`: errors, bounded waits, the cache directory, progress, whole-file writes;
- `qemu`: one QEMU process and its QMP connection, saved states (migration), disks;
- `lxd`: LXD's and Incus's device layouts, their ring-reading rules, the ring monitor;
- `vm`: one guest: its configuration and command line, firmware, console, acceleration
  (and the KVM probe), the machine-wide VM lock, the running `Vm`, warm starts (guests
  restored from a saved one);
- `image`: what a boot needs: Debian images, cloud disks, seeds, the agent's `.deb`, the
  emulated LXD agents;
- `scenarios`: flows that return verdicts (boot, check an image as it is, soak, snapshot,
  matrix);
- `cli`: the `lxd-agent-harness` command: options, reports (text, JSON, JUnit XML),
  interrupts, exit codes;
- `testing`: the pytest plugin (`lxd_vm`) and the synchronous guest it hands out.

Host side only: nothing here runs in a guest. The guest agent is the `lxd_agent` distribution,
whose `lxd_agent.protocol` names the ports and lines both sides agree on.
"""

__version__ = "0.2.0"
