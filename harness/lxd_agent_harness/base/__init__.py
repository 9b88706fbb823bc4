"""The harness's foundations: errors, bounded waits, the cache directory, progress, text files.

Imports nothing from the harness's other layers; everything else may import from here.
"""
