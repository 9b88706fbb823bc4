"""For writing tests on the harness: the pytest plugin (`plugin`, loaded through the `pytest11`
entry point) and the synchronous guest its `lxd_vm` fixture hands out (`guest`).

The top layer, beside `cli`: it may use every layer below and nothing imports it.
"""
