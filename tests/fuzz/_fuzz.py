"""Shared by the fuzz suites: example counts that follow the loaded hypothesis profile
(tests/conftest.py: "ci" has max_examples=25, "long" 500)."""

from hypothesis import settings


def examples(ci_count: float) -> int:
    """max_examples for a test that runs ``ci_count`` examples under the ci profile,
    scaled with the loaded profile (long: 20x)."""
    return max(1, int(ci_count * settings().max_examples // 25))
