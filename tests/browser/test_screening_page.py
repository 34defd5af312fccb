"""The screening page in a real browser: what a nurse, grader or ophthalmologist sees and can do.

The development model's head is untrained, so no test asserts a particular grade; each asserts that the page
shows what the service answered, in words, and that every control works from the keyboard.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

GRADE_LINE = re.compile(r"Grade [0-4]")
LEAKED_PLACEHOLDER = re.compile(r"\b(null|undefined|NaN|\[object Object\])\b")
ACTION_WORDS = (
    "Rescreen in 12 months.",
    "Refer to an ophthalmologist.",
    "Refer urgently to an ophthalmologist.",
)
SUMMARY_WORDS = ("Not referable", "Referable", "Urgent referral", "No decision yet")


def grade(page: Any, files: list[Path], patient: str = "") -> dict[str, Any]:
    """Pick ``files``, grade them, wait for the results; returns the service's JSON answer."""
    page.fill("#patient-ref", patient)
    page.set_input_files("#file-input", [str(f) for f in files])
    with page.expect_response(lambda r: "/v1/grade/batch" in r.url) as answer:
        page.click("#grade-button")
    page.wait_for_selector("#results:not([hidden]) .result")
    body: dict[str, Any] = answer.value.json()
    # The live region is filled just after the results appear.
    page.wait_for_selector("#status:has-text('Results for')")
    assert not LEAKED_PLACEHOLDER.search(page.inner_text("#results")), "a missing value was printed"
    return body


def card_for(page: Any, filename: str) -> Any:
    return page.locator("article.result", has_text=filename)


def test_grades_a_pair_of_eyes_with_heatmaps_and_a_patient_summary(
    open_page: Callable[..., Any], right_eye_photo: Path, left_eye_photo: Path, screenshot_dir: Path
) -> None:
    page = open_page()
    page.fill("#patient-ref", "DEMO-0001")
    page.set_input_files("#file-input", [str(right_eye_photo), str(left_eye_photo)])
    # The eye is read from the file names.
    assert page.locator("#queue .eye-select").evaluate_all("els => els.map(e => e.value)") == [
        "right",
        "left",
    ]
    with page.expect_response(lambda r: "/v1/grade/batch" in r.url) as response:
        page.click("#grade-button")
    page.wait_for_selector("#status:has-text('Results for 2 photos')")
    assert not LEAKED_PLACEHOLDER.search(page.inner_text("#results")), "a missing value was printed"
    answer = response.value.json()
    assert [i["result"]["status"] for i in answer["items"]] == ["graded", "graded"]

    for item in answer["items"]:
        result = item["result"]
        card = card_for(page, item["filename"])
        text = card.inner_text()
        assert f"Grade {result['grade']}" in text
        assert result["grade_name"] in text
        assert any(words in text for words in ACTION_WORDS)
        # The risk that decides the referral, the grade's own probability, and the point that made the decision.
        assert f"Estimated risk of referable diabetic retinopathy: {round(result['p_referable'] * 100)}%" in text
        assert f"Probability of the grade shown: {round(result['confidence'] * 100)}%" in text
        assert f"Operating point: {result['operating_point']}" in text
        if result["referral_reason"] == "risk":
            assert "Mild or no retinopathy seen; referred because the estimated risk" in text
        heatmap = card.locator("img.heatmap")
        heatmap.wait_for()
        assert heatmap.evaluate("img => img.complete && img.naturalWidth") == result["explanation"]["width"]
        photo = card.locator("figure.photo img")
        assert photo.evaluate("img => img.complete && img.naturalWidth") > 0

    # The opacity control fades the heatmap and says so to screen readers.
    slider = card_for(page, right_eye_photo.name).locator("input[type=range]")
    slider.fill("40")
    assert card_for(page, right_eye_photo.name).locator("img.heatmap").evaluate("i => i.style.opacity") == "0.4"
    assert slider.get_attribute("aria-valuetext") == "40%"
    assert "Warmer colours (yellow, red) = more evidence of disease" in page.inner_text("#heatmap-legend")

    summary = page.inner_text("#patient-summary")
    assert "Patient DEMO-0001" in summary
    assert any(words in summary for words in SUMMARY_WORDS)
    decision = answer["patients"][0]["decision"]
    expected = {"refer": "Refer", "no_refer": "Rescreen in 12 months.", "cannot_decide": "No decision yet"}
    assert expected[decision] in summary
    assert "Patient DEMO-0001" in page.inner_text("#status")
    page.screenshot(path=str(screenshot_dir / "results-desktop.png"), full_page=True)

    # The printed report: date, patient, model name and version, intended use; no form, no buttons.
    model = page.evaluate("fetch('/v1/model').then(r => r.json())")
    page.emulate_media(media="print")
    assert not page.is_visible("#screening-form")
    assert not page.is_visible("#print-button")
    report = page.inner_text("#results")
    assert "Diabetic retinopathy screening report" in report
    assert "DEMO-0001" in page.inner_text("#report-patient")
    assert page.inner_text("#report-date").strip()
    assert f"{model['name']}, version {model['version']}" in report
    assert model["intended_use"] in report
    page.screenshot(path=str(screenshot_dir / "report-print.png"), full_page=True)


def test_refuses_a_cat_and_says_what_to_do_for_each_photo_not_graded(
    open_page: Callable[..., Any],
    served_model: Any,
    dark_fundus_photo: Path,
    not_fundus_photo: Path,
    screenshot_dir: Path,
) -> None:
    if not served_model.real_gate:
        pytest.skip("the served model's quality gate is the development placeholder (grades anything)")
    page = open_page()
    answer = grade(page, [not_fundus_photo, dark_fundus_photo])
    assert answer["items"][0]["result"]["status"] == "not_fundus"

    refused = card_for(page, not_fundus_photo.name).inner_text()
    assert "Not graded" in refused
    assert "This is not a retinal photograph." in refused
    assert "Check the file" in refused
    assert not GRADE_LINE.search(refused)
    assert card_for(page, not_fundus_photo.name).locator("img.heatmap").count() == 0
    assert "not_fundus" not in page.inner_text("body")

    # Whatever the gate decided about the dark photo, the page shows that decision, in words.
    other = answer["items"][1]["result"]
    text = card_for(page, dark_fundus_photo.name).inner_text()
    if other["status"] == "ungradable":
        assert "Retake the photo" in text
        assert not GRADE_LINE.search(text)
        assert other["quality"]["reasons"]
        assert not any(code in text for code in other["quality"]["reasons"])
    else:
        assert f"Grade {other['grade']}" in text
    assert "No decision yet" in page.inner_text("#patient-summary") or other["referable"]
    assert f"Check the file {not_fundus_photo.name}" in page.inner_text("#patient-summary")
    page.screenshot(path=str(screenshot_dir / "not-graded.png"), full_page=True)


def test_a_file_that_is_not_an_image_is_explained_in_words(open_page: Callable[..., Any], tmp_path: Path) -> None:
    notes = tmp_path / "notes_right.txt"
    notes.write_text("not a photograph")
    page = open_page()
    answer = grade(page, [notes])
    assert answer["items"][0]["error"]["code"] == "unsupported_format"
    text = card_for(page, "notes_right.txt").inner_text()
    assert "This file is not an image the service can read" in text
    assert "unsupported_format" not in page.inner_text("body")


def test_keyboard_alone_reaches_every_step_with_visible_focus(
    open_page: Callable[..., Any], right_eye_photo: Path
) -> None:
    page = open_page()
    # Intercept file choosers from the start: Playwright turns interception on asynchronously, and a chooser
    # opened by Enter (on key down) can otherwise beat it.
    page.on("filechooser", lambda chooser: None)
    page.evaluate("0")  # a round trip, so the interception is in place
    photo = right_eye_photo
    focus_visible = """() => {
        const a = document.activeElement;
        const shown = a.id === 'file-input' ? a.nextElementSibling : a;
        const style = getComputedStyle(shown);
        return style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) >= 2;
    }"""

    def tab_to(element_id: str, limit: int = 12) -> list[str]:
        seen = []
        for _ in range(limit):
            page.keyboard.press("Tab")
            current = page.evaluate("document.activeElement.id")
            seen.append(current)
            assert page.evaluate(focus_visible), f"no visible focus on #{current}"
            if current == element_id:
                return seen
        raise AssertionError(f"Tab never reached #{element_id}; it went {seen}")

    assert "patient-ref" in tab_to("file-input")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(photo))
    tab_to("eye-0", limit=1)
    page.keyboard.press("l")  # type-ahead: "Left eye (OS)"
    assert page.eval_on_selector("#eye-0", "s => s.value") == "left"
    tab_to("grade-button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status:has-text('Results for 1 photo')")
    assert page.evaluate("document.activeElement.id") == "results-title"

    # Count calls instead of opening the print dialog (the trailing 0 keeps evaluate from calling it).
    page.evaluate("window.__printed = 0; window.print = () => { window.__printed += 1; }; 0")
    tab_to("print-button")
    page.keyboard.press("Enter")
    assert page.evaluate("window.__printed") == 1


def test_tablet_portrait_shows_results_without_sideways_scrolling(
    open_page: Callable[..., Any], right_eye_photo: Path, screenshot_dir: Path
) -> None:
    page = open_page(768, 1024)
    grade(page, [right_eye_photo], "DEMO-0002")
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    card = card_for(page, right_eye_photo.name)
    media = card.locator(".media").bounding_box()
    words = card.locator(".result-body").bounding_box()
    assert words["y"] >= media["y"] + media["height"] - 1, "images and words should stack on a tablet"
    for control in ("#grade-button", "#print-button", "input[type=range]", ".eye-select"):
        locator = page.locator(control).first
        if locator.count() and locator.is_visible():
            assert locator.bounding_box()["height"] >= 40, f"{control} is too small to tap"
    page.screenshot(path=str(screenshot_dir / "results-tablet.png"), full_page=True)


def test_rendered_text_passes_wcag_aa_contrast(
    open_page: Callable[..., Any], right_eye_photo: Path, left_eye_photo: Path
) -> None:
    page = open_page()
    grade(page, [right_eye_photo, left_eye_photo])
    failures = page.evaluate(CONTRAST_SCRIPT)
    assert failures == [], failures


def test_eye_is_guessed_from_the_file_name(open_page: Callable[..., Any]) -> None:
    page = open_page()
    names = {
        "16_right.jpeg": "right",
        "373_left.jpeg": "left",
        "IMG_0042_OD.jpg": "right",
        "patient7-OS.png": "left",
        "scan_L.jpg": "left",
        "scan_r.tif": "right",
        "RightEye.jpg": "right",
        "retina.jpg": "",
        "photos.jpg": "",
        "Odessa.jpg": "",
        "left_and_right.jpg": "",
    }
    guessed = page.evaluate("names => names.map(n => window.retinagrade.guessEye(n))", list(names))
    assert dict(zip(names, guessed, strict=True)) == names


@pytest.fixture(scope="module")
def keyed_url(
    make_settings: Callable[..., Any], start_service: Callable[..., Any], right_eye_photo: Path
) -> Iterator[str]:
    """A service that wants an API key and takes files of half the right-eye photo's size at most."""
    limit = right_eye_photo.stat().st_size // 2
    with start_service(make_settings(api_keys=["test-key-123"], max_image_bytes=limit)) as url:
        yield url


def test_api_key_is_asked_for_kept_in_the_tab_and_sent(
    open_page: Callable[..., Any], keyed_url: str, right_eye_photo: Path
) -> None:
    page = open_page(url=keyed_url)
    page.wait_for_selector("#api-key-form:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type("test-key-123")
    with page.expect_request(lambda r: r.url.endswith("/v1/model")) as request:
        page.keyboard.press("Enter")
    assert request.value.headers.get("x-api-key") == "test-key-123"
    page.wait_for_selector("#model-line:has-text('Model:')")
    assert page.is_hidden("#api-key-form")
    assert page.evaluate("sessionStorage.getItem('retinagrade.apiKey')") == "test-key-123"
    assert page.evaluate("localStorage.length") == 0

    # A photo over the service's size limit is explained, not graded.
    answer = grade(page, [right_eye_photo])
    assert answer["items"][0]["error"]["code"] == "image_too_large"
    assert "The photo is too large for the service" in card_for(page, right_eye_photo.name).inner_text()


CONTRAST_SCRIPT = """() => {
  const channel = c => { c /= 255; return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const parse = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const background = el => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const failures = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const checked = new Set();
  while (walker.nextNode()) {
    const el = walker.currentNode.parentElement;
    if (!walker.currentNode.textContent.trim() || checked.has(el)) continue;
    checked.add(el);
    const rect = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (rect.width <= 1 || rect.height <= 1 || style.visibility === 'hidden' || !el.offsetParent) continue;
    const fg = parse(style.color).slice(0, 3);
    const [l1, l2] = [luminance(fg), luminance(background(el))].sort((a, b) => b - a);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) {
      const text = el.textContent.trim().slice(0, 30);
      failures.push(`${el.tagName}.${el.className} "${text}" ${ratio.toFixed(2)}`);
    }
  }
  return failures;
}"""


@pytest.fixture(scope="module")
def lenient_url(
    served_model: Any,
    make_settings: Callable[..., Any],
    start_service: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A service whose gate refuses every photo by its score and lets any referable answer outrank that."""
    import json
    import shutil

    spec_path = Path(served_model.spec)
    folder = tmp_path_factory.mktemp("lenient-model")
    for item in spec_path.parent.iterdir():
        if item.is_file() and item.suffix in (".json", ".onnx"):
            shutil.copyfile(item, folder / item.name)
    spec = json.loads((folder / spec_path.name).read_text())
    spec.pop("gate_files", None)  # the edited gate is not the one the spec's checksums name
    (folder / spec_path.name).write_text(json.dumps(spec))
    gate_path = folder / spec.get("gate_file", "gate.json")
    gate = json.loads(gate_path.read_text())
    gate.update(threshold=1e-4, referable_override={"min_p_referable": 1e-9})
    gate_path.write_text(json.dumps(gate))
    with start_service(make_settings(model=folder / spec_path.name)) as url:
        yield url


def test_a_photo_graded_despite_its_quality_says_so_in_words(
    open_page: Callable[..., Any], lenient_url: str, right_eye_photo: Path
) -> None:
    page = open_page(url=lenient_url)
    answer = grade(page, [right_eye_photo])
    result = answer["items"][0]["result"]
    assert result["status"] == "graded" and result["quality"]["warning"] is True
    text = card_for(page, right_eye_photo.name).inner_text()
    assert f"Grade {result['grade']}" in text
    assert "Image quality: poor" in text and "Graded anyway" in text
    assert "Image quality: good" not in text
    reasons = result["quality"]["reasons"]
    assert reasons and card_for(page, right_eye_photo.name).locator(".quality-warning li").count() == len(reasons)
    assert not any("_" in code and code in text for code in reasons), "reasons are shown in words"
    assert page.evaluate(CONTRAST_SCRIPT) == []
