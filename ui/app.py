"""The web app: sign-in (and a patient's sign-up with a clinician's invitation code), then
for staff Diagnose, Worklist, History, Analytics*, Users*, Audit*, Model, Assistant
(* administrators only) and for patients only My results. Tabs are hidden by role, and every
handler re-checks the role server-side (`SessionStore.user` refuses patients by default).

``build_app(ctx)`` returns the `gr.Blocks`; ``launch(host, port)`` serves it (``python -m ui``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from ui import html
from ui.context import UiContext
from ui.errors import InvalidInput, SessionExpired
from ui.gateway import ServiceGateway
from ui.messages import friendly
from ui.pages.analytics_page import AnalyticsPage
from ui.pages.assistant_page import AssistantPage, case_line
from ui.pages.audit_page import AuditPage
from ui.pages.diagnose import DiagnosePage
from ui.pages.history import HistoryPage
from ui.pages.model_page import ModelPage
from ui.pages.patient_page import PatientPage
from ui.pages.users import UsersPage
from ui.pages.worklist_page import WorklistPage

log = logging.getLogger(__name__)

TITLE = "oncoflow · imaging decision support"
SYSTEM_FONTS = ["system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Consolas", "DejaVu Sans Mono", "monospace"]
SESSION_CHECK_S = 60
MAX_UPLOAD = "20mb"
UPLOAD_SWEEP_S = 600
UPLOAD_MAX_AGE_S = 1800


def theme() -> gr.themes.Base:
    """Calm blue-teal on light grey, system fonts only (nothing fetched from the internet)."""
    return gr.themes.Soft(
        primary_hue=gr.themes.colors.cyan,
        secondary_hue=gr.themes.colors.slate,
        neutral_hue=gr.themes.colors.slate,
        font=SYSTEM_FONTS,
        font_mono=MONO_FONTS,
        radius_size=gr.themes.sizes.radius_md,
    ).set(
        button_primary_background_fill="#1f6f8b",
        button_primary_background_fill_hover="#195b72",
        button_primary_text_color="#ffffff",
        body_background_fill="#f4f7f9",
        block_title_text_weight="600",
        block_title_text_color="#1f2a37",
        block_title_background_fill="transparent",
        block_label_background_fill="#ffffff",
        block_label_text_color="#374151",
        block_label_text_weight="600",
        block_label_border_width="0px",
    )


@dataclass
class App:
    """The built page and its parts (tests drive the handlers through these)."""

    ctx: UiContext
    blocks: gr.Blocks
    token: gr.State
    diagnose: DiagnosePage
    history: HistoryPage
    analytics: AnalyticsPage
    users: UsersPage
    model: ModelPage
    assistant: AssistantPage
    worklist: WorklistPage
    patient: PatientPage
    audit: AuditPage
    login: object
    sign_up: object
    check_session: object


def build_app(ctx: UiContext | None = None) -> App:
    ctx = ctx or UiContext.create()
    service = ServiceGateway(ctx.client)
    diagnose = DiagnosePage(ctx, service)
    history = HistoryPage(ctx)
    analytics = AnalyticsPage(ctx, service)
    users = UsersPage(ctx)
    model = ModelPage(ctx, service)
    assistant = AssistantPage(ctx, service)
    worklist = WorklistPage(ctx, service)
    patient = PatientPage(ctx)
    audit = AuditPage(ctx)

    # Uploads land in Gradio's cache under their original file names, which may identify a
    # patient: purge files older than UPLOAD_MAX_AGE_S every UPLOAD_SWEEP_S.
    with gr.Blocks(
        title=TITLE, analytics_enabled=False, delete_cache=(UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S)
    ) as blocks:
        token = gr.State(None)
        with gr.Row(equal_height=False, elem_id="of-top"):
            header = gr.HTML(html.header(), elem_id="of-header-box", scale=10)
            logout_button = gr.Button(
                "Sign out", size="sm", scale=0, min_width=110, visible=False, elem_id="of-logout"
            )
        gr.HTML(html.banner())
        with gr.Column(visible=True, elem_id="of-login") as login_view:
            gr.HTML(
                "<h2 style='margin:0 0 4px 0'>Sign in</h2>"
                "<div style='color:#6b7280;font-size:13px'>Authorised staff only. "
                "Accounts are issued by your administrator.</div>"
            )
            username = gr.Textbox(label="User name", elem_id="of-username", max_lines=1)
            password = gr.Textbox(
                label="Password", type="password", elem_id="of-password", max_lines=1
            )
            login_button = gr.Button("Sign in", variant="primary", elem_id="of-login-button")
            login_notice = gr.HTML(elem_id="of-login-notice")
            with gr.Accordion(
                "Patients: I have an invitation code from my clinician",
                open=False,
                elem_id="of-signup-box",
            ):
                signup_code = gr.Textbox(
                    label="Invitation code", max_lines=1, elem_id="of-signup-code"
                )
                signup_name = gr.Textbox(
                    label="Choose a user name", max_lines=1, elem_id="of-signup-name"
                )
                signup_password = gr.Textbox(
                    label="Choose a password (at least 10 characters)",
                    type="password",
                    max_lines=1,
                    elem_id="of-signup-password",
                )
                signup_repeat = gr.Textbox(
                    label="Repeat the password",
                    type="password",
                    max_lines=1,
                    elem_id="of-signup-repeat",
                )
                signup_button = gr.Button("Create my account", elem_id="of-signup-button")
        with (
            gr.Column(visible=False, elem_id="of-main") as main_view,
            gr.Tabs(elem_id="of-tabs") as tabs,
        ):
            with gr.Tab(
                "Diagnose", id="diagnose", visible=False, elem_id="of-tab-diagnose"
            ) as diagnose_tab:
                diagnose.build(token)
            with gr.Tab(
                "Worklist", id="worklist", visible=False, elem_id="of-tab-worklist"
            ) as worklist_tab:
                worklist.build(token)
            with gr.Tab(
                "My results", id="patient", visible=False, elem_id="of-tab-patient"
            ) as patient_tab:
                patient.build(token)
            with gr.Tab(
                "History", id="history", visible=False, elem_id="of-tab-history"
            ) as history_tab:
                history.build(token)
            with gr.Tab(
                "Analytics", id="analytics", visible=False, elem_id="of-tab-analytics"
            ) as analytics_tab:
                analytics.build(token)
            with gr.Tab("Users", id="users", visible=False, elem_id="of-tab-users") as users_tab:
                users.build(token)
            with gr.Tab("Audit", id="audit", visible=False, elem_id="of-tab-audit") as audit_tab:
                audit.build(token)
            with gr.Tab("Model", id="model", visible=False, elem_id="of-tab-model") as model_tab:
                model.build(token)
            with gr.Tab(
                "Assistant", id="assistant", visible=False, elem_id="of-tab-assistant"
            ) as chat_tab:
                assistant.build(token, diagnose.case)
        timer = gr.Timer(SESSION_CHECK_S, active=False)

        staff_tabs = (diagnose_tab, worklist_tab, history_tab, model_tab, chat_tab)
        admin_tabs = (analytics_tab, users_tab, audit_tab)
        signed_out = {
            token: None,
            login_view: gr.Column(visible=True),
            main_view: gr.Column(visible=False),
            logout_button: gr.Button(visible=False),
            patient_tab: gr.Tab(visible=False),
            timer: gr.Timer(active=False),
        } | {tab: gr.Tab(visible=False) for tab in (*staff_tabs, *admin_tabs)}

        def signed_in(user, new_token: str) -> dict:
            staff = not user.is_patient
            return (
                {
                    token: new_token,
                    login_view: gr.Column(visible=False),
                    main_view: gr.Column(visible=True),
                    logout_button: gr.Button(visible=True),
                    patient_tab: gr.Tab(visible=user.is_patient),
                    tabs: gr.Tabs(selected="diagnose" if staff else "patient"),
                    header: html.header(user.username, user.role, service.ready()),
                    username: "",
                    password: "",
                    login_notice: "",
                    timer: gr.Timer(active=True),
                }
                | {tab: gr.Tab(visible=staff) for tab in staff_tabs}
                | {tab: gr.Tab(visible=user.is_admin) for tab in admin_tabs}
            )

        def login(name: str, secret: str):
            try:
                user = ctx.accounts.authenticate(name, secret)
                new_token = ctx.sessions.create(user)
            except Exception as exc:
                return {password: "", login_notice: html.notice("error", friendly(exc, "sign-in"))}
            return signed_in(user, new_token)

        def sign_up(code: str, name: str, secret: str, repeat: str):
            """A patient's account from a clinician's invitation code; signed in at once."""
            try:
                if secret != repeat:
                    raise InvalidInput("The two passwords differ.")
                ctx.care.sign_up(code, name, secret)
                user = ctx.accounts.authenticate(name, secret)
                new_token = ctx.sessions.create(user)
            except Exception as exc:
                return {
                    signup_password: "",
                    signup_repeat: "",
                    login_notice: html.notice("error", friendly(exc, "sign-up")),
                }
            return signed_in(user, new_token) | {
                signup_code: "",
                signup_name: "",
                signup_password: "",
                signup_repeat: "",
            }

        def check_session(current: str | None):
            """Every minute: sign out an expired session; refresh the service status pill."""
            try:
                user = ctx.sessions.any_user(current, touch=False)
            except SessionExpired as exc:
                return signed_out | {
                    header: html.header(),
                    login_notice: html.notice("warn", str(exc)),
                }
            return {header: html.header(user.username, user.role, service.ready())}

        def logout(current: str | None):
            ctx.sessions.revoke(current)
            return None

        login_outputs = [
            token,
            login_view,
            main_view,
            logout_button,
            patient_tab,
            *staff_tabs,
            *admin_tabs,
            tabs,
            header,
            username,
            password,
            login_notice,
            timer,
        ]
        signup_fields = [signup_code, signup_name, signup_password, signup_repeat]
        for event in (
            login_button.click(
                login, [username, password], login_outputs, api_visibility="private"
            ),
            password.submit(login, [username, password], login_outputs, api_visibility="private"),
            signup_button.click(
                sign_up, signup_fields, login_outputs + signup_fields, api_visibility="private"
            ),
        ):
            event.then(
                diagnose.load_model,
                [token],
                [diagnose.info, diagnose.schema, diagnose.upload, diagnose.method, diagnose.notice],
                api_visibility="private",
            ).then(patient.refresh, patient.inputs, patient.outputs, api_visibility="private")
        timer.tick(
            check_session, [token], login_outputs, api_visibility="private", show_progress="hidden"
        )
        logout_button.click(logout, [token], [token], api_visibility="private").then(
            None, js="() => { window.location.reload(); }"
        )
        history_tab.select(
            history.search, history.inputs, history.outputs, api_visibility="private"
        )
        analytics_tab.select(
            analytics.refresh, analytics.inputs, analytics.outputs, api_visibility="private"
        )
        users_tab.select(users.refresh, users.inputs, users.outputs, api_visibility="private")
        audit_tab.select(audit.refresh, audit.inputs, audit.outputs, api_visibility="private")
        worklist_tab.select(
            worklist.refresh, worklist.inputs, worklist.outputs, api_visibility="private"
        )
        patient_tab.select(
            patient.refresh, patient.inputs, patient.outputs, api_visibility="private"
        )
        model_tab.select(model.refresh, model.inputs, model.outputs, api_visibility="private")
        chat_tab.select(case_line, [diagnose.case], [assistant.context], api_visibility="private")

    return App(
        ctx=ctx,
        blocks=blocks,
        token=token,
        diagnose=diagnose,
        history=history,
        analytics=analytics,
        users=users,
        model=model,
        assistant=assistant,
        worklist=worklist,
        patient=patient,
        audit=audit,
        login=login,
        sign_up=sign_up,
        check_session=check_session,
    )


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    ctx: UiContext | None = None,
    block: bool = True,
):
    """Serve the UI on http://host:port (blocks until interrupted unless `block` is False)."""
    app = build_app(ctx)
    if not app.ctx.accounts.has_admin():
        log.warning(
            "no administrator account yet: set ONCOFLOW_UI_ADMIN_USER and "
            "ONCOFLOW_UI_ADMIN_PASSWORD, or run `python -m ui.accounts create-admin NAME`"
        )
    log.info("UI on http://%s:%d using the service at %s", host, port, app.ctx.config.service_url)
    app.blocks.queue(default_concurrency_limit=4)
    app.blocks.launch(
        server_name=host,
        server_port=port,
        theme=theme(),
        css=html.CSS,
        footer_links=[],
        show_error=False,
        ssr_mode=False,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[
            str(app.diagnose.reports_dir),
            str(app.patient.reports_dir),
            str(app.audit.exports_dir),
        ],
        blocked_paths=[str(app.ctx.config.workspace.resolve())],
        prevent_thread_lock=not block,
        quiet=True,
    )
    return app
