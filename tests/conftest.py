"""How `pytest -n 2` shares the suite between its two processes, so that they end together:
the longest tests first (started last, a 30 s test leaves the other process idle for most of
it), and work stealing (a process that runs out takes tests queued for the other, where
xdist's default keeps each process's queue its own to the end). The rest keeps pytest's order.
Measured with --durations: the tests of these modules take 5-30 s each."""
FIRST = ("tests/test_runner.py", "tests/test_cuda_path.py", "tests/test_probe.py",
         "tests/test_distill.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest in order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import WorkStealingScheduling
    return WorkStealingScheduling(config, log)
