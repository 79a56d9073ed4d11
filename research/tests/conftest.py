"""The project's test helpers and setup (tests/conftest.py) for the research scripts' tests."""

from tests.conftest import *  # noqa: F403
