"""The Ray dashboard of a real run, in a real browser: the token dialog first, the trial's
actor with its node and resources once logged in (tests/tune/dashboard_check.py)."""

from __future__ import annotations

import pytest

from .dashboard_check import check, find_browser

pytestmark = pytest.mark.ray


def test_after_login_the_actors_page_shows_the_trial_with_its_node_and_resources(
        tiny_dataset, tmp_path):
    if find_browser() is None:
        pytest.fail("no headless Chromium: setup.sh installs chromium-headless-shell")
    result = check(tiny_dataset, tmp_path, screenshot=None)
    # The row held the trial's own record of its node and its CPU request.
    assert result["actor_class"] == "ImplicitFunc"
    assert result["node id"] in result["row"] and result["pid"] in result["row"]
    assert '"CPU": | 1' in result["row"]
