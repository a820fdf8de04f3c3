"""Attack tests: one supervisor with a paused QEMU attached per policy and module, attacked by real uids."""

from __future__ import annotations

import pytest

from arena import POLICIES, Arena


@pytest.fixture(scope="module", params=POLICIES)
def arena(request, tmp_path_factory):
    """Shared by every attack of a module: starting a supervisor and QEMU per attack would take minutes."""
    opened = Arena.open(tmp_path_factory.mktemp(request.param), request.param)
    yield opened
    assert opened.close() == 0, opened.supervisor.log()
