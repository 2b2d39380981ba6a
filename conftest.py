"""pytest hooks for the whole repository: under nbval, a table of each notebook's time.

The CI budget gives each chapter 90 s and each lab's CPU setting 3 minutes; this table
makes every notebook's share visible at the end of ``make notebooks-check``.
"""

from collections import defaultdict

_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _NOTEBOOK_SECONDS:
        return
    terminalreporter.write_line("")
    terminalreporter.write_line("notebook                                       seconds")
    for path, seconds in sorted(_NOTEBOOK_SECONDS.items()):
        terminalreporter.write_line(f"{path:45s} {seconds:8.0f}")
