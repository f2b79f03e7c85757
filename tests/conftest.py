import os
import sys

import pytest

# the project is flat scripts at the top level: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A skip is for a user without the network or an optional package, and says why in one line (-rs
# lists them). In CI (CI=true) everything the tests need is installed, so a skip there is a failure.
def fail_in_ci(report):
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped in CI, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    fail_in_ci(outcome.get_result())


def pytest_collection_modifyitems(items):
    """The end-to-end demo first: it is the longest test, so that under pytest-xdist (-n 2, as the README
    runs the suite) the other worker runs the rest beside it rather than after it."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_demo.py"))
