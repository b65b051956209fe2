"""tested-versions.txt, setup.cfg's bounds and README's table say the same thing (.ci/versions.py)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


def load_versions_tool():
    spec = importlib.util.spec_from_file_location("ci_versions", REPO / ".ci" / "versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_cfg_admits_exactly_up_to_the_tested_versions():
    versions = load_versions_tool()
    tested = versions.read_pins(versions.TESTED.read_text())
    for line in versions.requirement_lines():
        name, specs = versions.specifiers(line)
        upper = [spec for spec in specs if spec.startswith("<")]
        assert upper == [f"<={tested[versions.canonical(name)]}"], \
            f"setup.cfg: {line!r} should end at the tested {tested.get(versions.canonical(name))}"


def test_readme_lists_the_tested_versions():
    versions = load_versions_tool()
    assert versions.readme_table() in (REPO / "README.md").read_text(), \
        "README's 'Tested versions' table is stale: python3 .ci/versions.py record .venv rewrites it"


def test_newest_lifts_upper_bounds_and_oldest_takes_the_lower_bound():
    versions = load_versions_tool()
    assert versions.without_upper_bounds("torch>=2.4,<=2.14.1") == "torch>=2.4"
    assert versions.without_upper_bounds("litert-torch>=0.10,<0.11") == "litert-torch>=0.10"
    assert versions.lower_bound("accelerate>=1.0,<=1.16.0") == "accelerate==1.0"


@pytest.mark.xdist_group("grouping_check")
def test_pytest_xdist_groups_take_effect(request):
    """setup.cfg's `--dist loadgroup` sends the tests of one xdist_group to one worker, so that a
    module-scoped run or page is made once. pytest 9.2.0 made pytest-xdist 3.8.0 ignore the marks
    without a word (pytest-dev/pytest-xdist#1386): the group name no longer reaches the test's id."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by a pytest-xdist worker with --dist loadgroup")
    assert request.node.nodeid.endswith("@grouping_check")
