"""A goal of BENCHMARKS.md judged at its own threshold: the figure is printed, and a miss fails the bench run."""

from __future__ import annotations


def judge(goal: str, met: bool, figure: str) -> None:
    """Print ``goal: figure -> met | NOT MET`` and fail the benchmark when it is not met."""
    print(f"\n{goal}: {figure} -> {'met' if met else 'NOT MET'}", flush=True)
    assert met, f"goal not met: {goal}: {figure}"
