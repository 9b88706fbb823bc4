"""How the harness reports progress: a callback that takes one line for a person.

Every long step (an image build, a boot, a scenario) takes one; the command line passes a
printer, the tests a list's `append`. Nothing here prints.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str], None]
"""Called with one line of progress, e.g. `image: mke2fs -d (kernel 6.1.0-28-cloud-amd64)`."""
