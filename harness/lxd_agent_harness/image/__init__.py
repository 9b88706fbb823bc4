"""What a boot needs: Debian guest images (mmdebstrap), cloud disks, NoCloud seeds, the agent's
`.deb`, and the emulated LXD agents' packages.

Boots nothing.
"""
