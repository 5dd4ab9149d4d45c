#!/usr/bin/env bash
# Runs the test suite, creating .venv and installing the test extras first if needed.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/metrics_test.py`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" test
exec python -m pytest tests -q "$@"
