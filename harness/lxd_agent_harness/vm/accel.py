"""Which accelerator a guest runs under: the user's choice (`Accel`), the decision (`AccelChoice`).

Only the vocabulary: deciding, which needs a probe boot under KVM, is `vm.kvm_probe`. Host side
only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Accel(str, enum.Enum):
    """Which accelerator to use: `auto` probes KVM first and falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
