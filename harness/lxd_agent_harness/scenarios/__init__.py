"""What the harness proves, one flow a module, each returning a verdict: a boot and check, the
soak, the stateful snapshot, the compatibility matrix.

Never prints and never exits: the command line and the tests are thin callers.
"""
