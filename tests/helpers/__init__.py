"""What the tests load besides the package: the tiny offline training setup and the runners of
the robustness checks (bad inputs, SIGKILL and resume, which process writes which file).

The tests import them as ``helpers.<module>`` (``tests/`` is on ``sys.path`` under pytest); the
measurement scripts in ``experiments/`` import them as ``tests.helpers.<module>`` (run from the
repository root with ``python -m experiments.<script>``).
"""
