"""The care workflow in headless Chromium against the real served model (the session's model,
service and UI from conftest.py), with a screenshot per step.

A clinician analyses a real MRI slice, invites the patient and releases the result; the patient
signs up with the code, reads the result in plain words, downloads the released PDF and asks a
question; the clinician answers from the worklist; the patient sees the answer. A second
patient cannot open the first one's case: the page offers only their own, and a rewritten
request (the browser's own call with the other case number put in) is refused by the server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_ui_browser import TIMEOUT_MS, Steps, open_tab, settle, sign_in, sign_out

pytestmark = pytest.mark.e2e

DOCTOR = ("dr.care", "care-clinic-pass-01")
PATIENT = ("pat.first", "first-patient-pass")
OTHER = ("pat.second", "second-patient-pass")
NOTE = "Nothing urgent: we will see you in clinic in June."


@pytest.fixture
def page(browser, ui_url):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(ui_url)
    yield page
    context.close()


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def analyse(page, image: Path, case_ref: str) -> int:
    """Upload (unless an image is already there) and analyse on the Diagnose tab; returns
    the case number the UI saved."""
    from playwright.sync_api import expect

    open_tab(page, "Diagnose")
    if page.locator("#of-upload input[type=file]").count():  # else: the last upload stays
        page.locator("#of-upload input[type=file]").set_input_files(str(image))
    expect(page.locator("#of-preview img")).to_be_visible()
    fill(page, "of-case-ref", case_ref)
    page.locator("#of-analyse").click()
    result = page.locator("#of-result")
    expect(result).to_contain_text(f"case id {case_ref}")
    settle(page)
    return int(re.search(rf"Case #(\d+) · case id {case_ref}", result.inner_text()).group(1))


def open_case(page, number: int) -> None:
    open_tab(page, "Worklist")
    fill(page, "of-w-case", str(number))
    page.locator("#of-w-open").click()


def invite(page, number: int) -> str:
    from playwright.sync_api import expect

    open_case(page, number)
    page.locator("#of-w-invite").click()
    code = page.locator("#of-w-code")
    expect(code).to_contain_text("Invitation code")
    return re.search(r"[A-Z2-9]{5}-[A-Z2-9]{5}-[A-Z2-9]{5}", code.inner_text()).group(0)


def sign_up(page, code: str, user: str, password: str) -> None:
    page.get_by_text("Patients: I have an invitation code from my clinician").click()
    fill(page, "of-signup-code", code)
    fill(page, "of-signup-name", user)
    page.locator("#of-signup-password input").fill(password)
    page.locator("#of-signup-repeat input").fill(password)
    page.locator("#of-signup-button").click()


def test_patient_release_question_and_isolation(page, screenshots, accounts, mri_image):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    steps = Steps(page, screenshots)
    admin, _ = accounts

    # 1. The admin creates the clinician's account.
    sign_in(page, *admin)
    open_tab(page, "Users")
    fill(page, "of-new-user", DOCTOR[0])
    page.locator("#of-new-password input").fill(DOCTOR[1])
    page.locator("#of-create-user").click()
    expect(page.locator("#of-users-notice")).to_contain_text("created")
    sign_out(page)

    # 2. The clinician analyses a real MRI slice, invites the patient, reviews and releases.
    sign_in(page, *DOCTOR)
    number = analyse(page, mri_image, "E2E-CARE-1")
    code = invite(page, number)
    page.locator("#of-w-review").click()
    expect(page.locator("#of-w-notice")).to_contain_text("marked as reviewed")
    fill(page, "of-w-note", NOTE)
    page.locator("#of-w-release").click()
    expect(page.locator("#of-w-notice")).to_contain_text("released to the patient")
    page.locator("#of-w-refresh").click()
    expect(page.locator("#of-w-summary")).to_contain_text("riskiest first")
    steps.shot("care-clinician-released")
    # a second case for a second patient
    other_number = analyse(page, mri_image, "E2E-CARE-2")
    other_code = invite(page, other_number)
    sign_out(page)

    # 3. The patient signs up with the code and reads the released result in plain words.
    sign_up(page, code, *PATIENT)
    expect(page.get_by_role("tab", name="My results")).to_be_visible()
    expect(page.get_by_role("tab", name="Diagnose")).to_have_count(0)
    expect(page.get_by_role("tab", name="Worklist")).to_have_count(0)
    expect(page.locator("#of-p-cases")).to_contain_text("Result ready")
    page.locator("#of-p-open").click()
    card = page.locator("#of-p-result")
    expect(card).to_contain_text("What the computer program suggested")
    expect(card).to_contain_text("A clinician reviewed this result")
    expect(card).to_contain_text(NOTE)
    with page.expect_download() as info:
        page.locator("#of-p-download").click()
    assert Path(info.value.path()).read_bytes().startswith(b"%PDF-")
    fill(page, "of-p-question", "Do I need another scan?")
    page.locator("#of-p-ask").click()
    expect(page.locator("#of-p-thread")).to_contain_text("Waiting for an answer")
    steps.shot("care-patient-result-and-question")
    sign_out(page)

    # 4. The clinician sees the waiting question on the worklist and answers it.
    sign_in(page, *DOCTOR)
    open_tab(page, "Worklist")
    page.locator("#of-w-refresh").click()
    expect(page.locator("#of-worklist")).to_contain_text("1 waiting")
    open_case(page, number)
    expect(page.locator("#of-w-thread")).to_contain_text("Do I need another scan?")
    fill(page, "of-w-answer", "No, the June appointment is enough.")
    page.locator("#of-w-send-answer").click()
    expect(page.locator("#of-w-notice")).to_contain_text("answer was sent")
    steps.shot("care-clinician-answered")
    sign_out(page)

    # 5. The patient sees the answer.
    sign_in(page, *PATIENT)
    page.locator("#of-p-open").click()
    expect(page.locator("#of-p-thread")).to_contain_text("No, the June appointment is enough.")
    steps.shot("care-patient-sees-answer")
    sign_out(page)

    # 6. A second patient sees only their own case: the page offers no other.
    sign_up(page, other_code, *OTHER)
    expect(page.locator("#of-p-cases")).to_contain_text("Waiting for your clinician")
    page.locator("#of-p-case input").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(1)
    expect(options.first).to_contain_text(f"Case #{other_number} ")
    options.first.click()
    expect(page.locator("#of-p-result")).to_contain_text("has not released this result yet")
    expect(page.locator("#of-p-result")).not_to_contain_text(NOTE)
    steps.shot("care-second-patient-own-case-only")

    # ...and through a direct request: the browser's own call, rewritten to the other case.
    rewritten = []

    def swap(route):
        body = json.loads(route.request.post_data or "{}")
        data = [str(number) if v == str(other_number) else v for v in body.get("data", [])]
        if data != body.get("data"):
            rewritten.append(True)
        route.continue_(post_data=json.dumps(body | {"data": data}))

    settle(page)
    page.route("**/queue/join*", swap)
    page.locator("#of-p-open").click()
    expect(page.locator("#of-p-notice")).to_contain_text("not found")
    page.unroute("**/queue/join*")
    assert rewritten, "no request carried the case number"
    expect(page.locator("#of-p-result")).not_to_contain_text(NOTE)
    steps.shot("care-second-patient-refused-direct-request")
