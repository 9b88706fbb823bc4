"""The suite's own scheduling hint (tests/conftest.py): the longest modules it names exist, so
a renamed module cannot silently drop out of the order the workers take them in."""

from __future__ import annotations

from tests.conftest import LONGEST_MODULES
from tests.repo import REPO


def test_every_module_named_longest_exists_and_they_are_in_order_longest_first() -> None:
    assert [name for name in LONGEST_MODULES if not (REPO / name).is_file()] == []
    seconds = list(LONGEST_MODULES.values())
    assert seconds == sorted(seconds, reverse=True)
