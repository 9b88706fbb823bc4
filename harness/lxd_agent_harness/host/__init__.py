"""Real hosts: a guest run by a real LXD (or Incus) daemon, and the daemon's view of its agent.

Beside `vm/` (the harness's own QEMU, modelled on those hosts' templates), another way to get a
running guest: the daemon's own binaries start QEMU with the daemon's own configuration, and
every observation comes from the daemon's side (its API, its log, its `qemu.conf`). `rest`
speaks the daemon's API, `daemon` starts one in a state directory of the harness's own,
`probes` finds what this machine lacks and `launcher` and `packages` work around it, `instance`
is one VM (its console through `websocket` where the daemon keeps it behind its API), `config`
sets the daemon's `qemu.conf` against the harness's layouts. The verdicts are
`scenarios.host_check`'s. Host side only: the guest agent never imports this package.
"""
