"""Helpers shared by the unit and integration tests of plan."""

from __future__ import annotations

import pytest

# A mid-size ConvLLaVA: a 6-layer, 768-wide LM with Vicuna's 32000-token vocabulary and a small five-stage tower,
# about 100M parameters (400 MB in fp32).


def _plan_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from jobs.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as info:
        main(["plan", *args])
    return info.value.code, buf.getvalue()
