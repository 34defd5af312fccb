"""Decodes in progress share one memory budget: one that does not fit waits for the others to finish."""

from __future__ import annotations

import asyncio

from retinagrade.api.service import DecodeBudget
from retinagrade.api.telemetry import ServiceMetrics


def test_decodes_over_the_budget_wait_their_turn() -> None:
    async def scenario() -> tuple[list[str], int]:
        budget = DecodeBudget(100, ServiceMetrics())
        events: list[str] = []
        peak = 0

        async def decode(name: str, size: int) -> None:
            nonlocal peak
            async with budget.hold(size):
                peak = max(peak, budget.held)
                events.append(f"start {name}")
                await asyncio.sleep(0.01)
                events.append(f"end {name}")

        await asyncio.gather(decode("a", 60), decode("b", 60), decode("c", 30))
        assert budget.held == 0
        return events, peak

    events, peak = asyncio.run(scenario())
    assert peak <= 100
    assert events.index("end a") < events.index("start b")  # b (60) never ran beside a (60)
    assert events.index("start c") < events.index("end a")  # c (30) fitted beside a
