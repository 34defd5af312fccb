"""WCAG AA contrast of the page's colour variables, computed from app.css (no browser needed).

The browser test ``test_rendered_text_passes_wcag_aa_contrast`` checks the text as actually rendered; this one
also covers colours that a given page state may not show (every referral state, focus rings, borders).
"""

from __future__ import annotations

import re
from importlib.resources import files

import pytest

#: Text: foreground variable on background variable, at least 4.5:1 (WCAG 1.4.3, normal-size text).
TEXT_PAIRS = [
    ("text", "page"),
    ("text", "surface"),
    ("muted", "surface"),
    ("muted", "page"),
    ("accent", "surface"),
    ("accent", "page"),
    ("accent-text", "accent"),
    ("accent-text", "accent-hover"),
    ("error", "surface"),
    ("ok-fg", "ok-bg"),
    ("refer-fg", "refer-bg"),
    ("urgent-fg", "urgent-bg"),
    ("neutral-fg", "neutral-bg"),
    ("text", "ok-bg"),
    ("text", "refer-bg"),
    ("text", "urgent-bg"),
    ("text", "neutral-bg"),
    ("muted", "neutral-bg"),
]
#: Controls, focus rings and state borders next to what surrounds them, at least 3:1 (WCAG 1.4.11).
NON_TEXT_PAIRS = [
    ("line", "surface"),
    ("line", "page"),
    ("focus", "surface"),
    ("focus", "page"),
    ("ok-border", "surface"),
    ("refer-border", "surface"),
    ("urgent-border", "surface"),
    ("neutral-border", "surface"),
    ("refer-border", "page"),
]


def css_variables() -> dict[str, str]:
    css = (files("retinagrade.api") / "static" / "app.css").read_text()
    root = re.search(r":root\s*\{(.*?)\}", css, re.S)
    assert root, "app.css has no :root block"
    return dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})\b", root.group(1)))


def luminance(hex_colour: str) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_formula_matches_known_values() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic near miss


@pytest.mark.parametrize(("fg", "bg"), TEXT_PAIRS, ids=[f"{f}-on-{b}" for f, b in TEXT_PAIRS])
def test_text_colours_pass_aa(fg: str, bg: str) -> None:
    colours = css_variables()
    assert contrast(colours[fg], colours[bg]) >= 4.5


@pytest.mark.parametrize(("fg", "bg"), NON_TEXT_PAIRS, ids=[f"{f}-on-{b}" for f, b in NON_TEXT_PAIRS])
def test_controls_and_state_borders_pass_aa(fg: str, bg: str) -> None:
    colours = css_variables()
    assert contrast(colours[fg], colours[bg]) >= 3.0
