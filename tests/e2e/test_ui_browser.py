"""The clinician UI in headless Chromium against a real running diagnosis service.

One scenario, step by step, with a screenshot per step (in $ONCOFLOW_SCREENSHOTS or a temporary
directory, printed at the start): a wrong password is refused; the admin creates a clinician;
the clinician signs in, cannot see the admin tabs, uploads a real MRI slice, sees the
prediction and Grad-CAM, downloads the PDF report, sends feedback and finds the case in
History; the admin finds that feedback in Analytics.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TIMEOUT_MS = 90_000
CASE_REF = "E2E-0001"


@pytest.fixture
def page(browser, ui_url):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(ui_url)
    yield page
    context.close()


class Steps:
    """Numbered full-page screenshots."""

    def __init__(self, page, directory: Path) -> None:
        self.page, self.directory, self.n = page, directory, 0

    def shot(self, name: str) -> Path:
        settle(self.page)
        self.n += 1
        path = self.directory / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def settle(page) -> None:
    """Wait until Gradio shows no pending update (its translucent progress overlays)."""
    page.wait_for_function(
        "() => !document.querySelector('.pending, .wrap.translucent:not(.hide)')"
    )
    page.wait_for_timeout(300)  # let the last update paint


def sign_in(page, user: str, password: str) -> None:
    page.locator("#of-username textarea, #of-username input").first.fill(user)
    page.locator("#of-password input").fill(password)
    page.locator("#of-login-button").click()


def noise_png(folder: Path) -> Path:
    """A 256x256 PNG of uniform pixel noise (seeded)."""
    import numpy as np
    from PIL import Image

    path = folder / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sign_out(page) -> None:
    page.locator("#of-logout").click()
    page.locator("#of-login-button").wait_for(state="visible")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_clinician_journey(page, screenshots, accounts, mri_image):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    steps = Steps(page, screenshots)
    admin, clinician = accounts

    # 1. A wrong password is refused.
    sign_in(page, admin[0], "not-the-password")
    expect(page.locator("#of-login-notice")).to_contain_text("wrong password")
    expect(page.locator("#of-main")).to_be_hidden()
    steps.shot("wrong-password-refused")

    # 2. The admin signs in and creates a clinician account.
    sign_in(page, admin[0], admin[1])
    expect(page.get_by_role("tab", name="Analytics")).to_be_visible()
    open_tab(page, "Users")
    page.locator("#of-new-user textarea, #of-new-user input").first.fill(clinician[0])
    page.locator("#of-new-password input").fill(clinician[1])
    page.locator("#of-create-user").click()
    expect(page.locator("#of-users-notice")).to_contain_text("created")
    expect(page.locator("#of-users")).to_contain_text(clinician[0])
    steps.shot("admin-created-clinician")
    sign_out(page)

    # 3. The clinician signs in and sees no admin views.
    sign_in(page, *clinician)
    expect(page.locator("#of-main")).to_be_visible()
    expect(page.get_by_role("tab", name="Diagnose")).to_be_visible()
    expect(page.get_by_role("tab", name="Analytics")).to_have_count(0)
    expect(page.get_by_role("tab", name="Users")).to_have_count(0)
    steps.shot("clinician-signed-in-no-admin-tabs")

    # 4. Upload a real MRI slice, see the prediction and Grad-CAM.
    page.locator("#of-upload input[type=file]").set_input_files(str(mri_image))
    expect(page.locator("#of-preview img")).to_be_visible()
    page.locator("#of-case-ref textarea, #of-case-ref input").first.fill(CASE_REF)
    page.locator("#of-analyse").click()
    result = page.locator("#of-result")
    expect(result).to_contain_text("Model confidence")
    expect(result).to_contain_text(re.compile(r"Glioma|Meningioma|No tumor|Pituitary"))
    expect(page.locator("#of-probabilities img")).to_be_visible()
    expect(page.locator("#of-overlay img")).to_be_visible()
    expect(page.locator("#of-heatmap img")).to_be_visible()
    # the calibrated model's prediction set and referral, in words
    expect(page.locator("#of-prediction-set")).to_contain_text(
        re.compile(r"Prediction set: (Glioma|Meningioma|No tumor|Pituitary)")
    )
    expect(page.locator("#of-referral-reason")).to_contain_text(
        re.compile(r"refer for specialist review|prediction set holds")
    )
    expect(page.locator("#of-danger")).to_contain_text("Probability of a dangerous finding")
    steps.shot("prediction-and-gradcam")

    # 5. Download the PDF report.
    page.locator("#of-report").click()
    download_button = page.locator("#of-download")
    expect(download_button).to_be_visible()
    with page.expect_download() as info:
        download_button.click()
    pdf = Path(info.value.path()).read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 2000
    steps.shot("pdf-report-ready")

    # 6. Feedback: the clinician disagrees and gives the true label and a note.
    predicted = page.locator("#of-result .of-label").inner_text().strip()
    truth = "Meningioma tumor" if predicted != "Meningioma tumor" else "Glioma tumor"
    page.locator("#of-verdict").get_by_text("Disagree").click()
    page.locator("#of-true-label input").click()
    page.get_by_role("option", name=truth).click()
    page.locator("#of-note textarea").fill("e2e check: second reader disagrees")
    page.locator("#of-send-feedback").click()
    expect(page.locator("#of-feedback-notice")).to_contain_text("saved")
    steps.shot("feedback-sent")

    # 7. The assistant answers with the open case as context.
    open_tab(page, "Assistant")
    expect(page.locator("#of-chat-context")).to_contain_text("case #")
    page.locator("#of-question textarea").fill("Why is the confidence of this result low?")
    page.locator("#of-ask").click()
    answer = page.locator("#of-chat .bot, #of-chat [data-testid=bot]").last
    expect(answer).to_contain_text("not a diagnosis")
    steps.shot("assistant-with-case")

    # 8. The case and its feedback are in History.
    open_tab(page, "History")
    history = page.locator("#of-history")
    expect(history).to_contain_text(CASE_REF)
    expect(history).to_contain_text("Disagreed")
    expect(history).to_contain_text(truth)
    steps.shot("history")

    # 8b. Pixel noise is not an MRI: no diagnosis, a referral in words, nothing saved. (A
    # reload gives an empty upload field: Gradio removes the file input once a file is in.)
    sign_out(page)
    page.reload()
    sign_in(page, *clinician)
    page.locator("#of-upload input[type=file]").set_input_files(str(noise_png(screenshots)))
    page.locator("#of-analyse").click()
    expect(page.locator("#of-ood")).to_contain_text("unlike the images the model was trained on")
    expect(page.locator("#of-result")).to_contain_text("Refer for specialist review")
    expect(page.locator("#of-result")).not_to_contain_text("Model confidence")
    steps.shot("noise-out-of-distribution")
    sign_out(page)

    # 9. The admin sees the feedback in Analytics.
    sign_in(page, admin[0], admin[1])
    open_tab(page, "Analytics")
    kpis = page.locator("#of-kpis")
    expect(kpis).to_contain_text("Predictions")
    expect(kpis).to_contain_text("0% (0/1)")  # one rated case, the model was wrong
    expect(page.locator("#of-accuracy")).to_contain_text(truth)
    steps.shot("admin-analytics")
    open_tab(page, "Model")
    expect(page.locator("#of-model-card")).to_contain_text("brain-mri-e2e")
    steps.shot("model-card")
