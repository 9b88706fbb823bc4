"""What LXD and Incus hosts do: their device layouts, how they read a status ring, the monitor
that reads rings over QMP the way they do.

Builds no command line and boots nothing (that is `vm`).
"""
