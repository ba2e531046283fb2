"""Users (admins): list accounts, create clinicians or admins, disable, enable, unlock, reset."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from ui import html
from ui.accounts import ROLES, User
from ui.context import UiContext
from ui.errors import InvalidInput
from ui.messages import friendly
from ui.pages.history import when


def users_frame(users: list[User], now: float) -> pd.DataFrame:
    rows = []
    for u in users:
        status = "Active" if u.active else "Disabled"
        if u.locked_until > now:
            status += f" · locked until {when(u.locked_until)} UTC"
        rows.append(
            [
                u.username,
                u.role,
                status,
                when(u.created_at),
                when(u.last_login) if u.last_login else "never",
            ]
        )
    return pd.DataFrame(
        rows, columns=["User", "Role", "Status", "Created (UTC)", "Last sign-in (UTC)"]
    )


class UsersPage:
    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def build(self, token: gr.State) -> None:
        self.notice = gr.HTML(elem_id="of-users-notice")
        self.table = gr.Dataframe(elem_classes="of-table", interactive=False, elem_id="of-users")
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                gr.HTML('<div class="of-section-title">Create an account</div>')
                self.new_name = gr.Textbox(label="User name", elem_id="of-new-user")
                self.new_password = gr.Textbox(
                    label="Initial password",
                    type="password",
                    elem_id="of-new-password",
                    info="At least 10 characters; share it with the user in person.",
                )
                self.new_role = gr.Radio(
                    list(ROLES), value="clinician", label="Role", elem_id="of-new-role"
                )
                self.create_button = gr.Button(
                    "Create account", variant="primary", elem_id="of-create-user"
                )
            with gr.Column(variant="panel"):
                gr.HTML('<div class="of-section-title">Manage an account</div>')
                self.target = gr.Dropdown(choices=[], label="User", elem_id="of-target-user")
                with gr.Row():
                    self.disable_button = gr.Button("Disable", variant="stop")
                    self.enable_button = gr.Button("Enable")
                    self.unlock_button = gr.Button("Unlock")
                self.reset_password = gr.Textbox(label="New password", type="password")
                self.reset_button = gr.Button("Reset password")
        outputs = [self.notice, self.table, self.target]
        self.inputs, self.outputs = [token], outputs
        self.create_button.click(
            self.create,
            [token, self.new_name, self.new_password, self.new_role],
            [*outputs, self.new_name, self.new_password],
            api_visibility="private",
        )
        for button, action in (
            (self.disable_button, "disable"),
            (self.enable_button, "enable"),
            (self.unlock_button, "unlock"),
        ):
            button.click(
                lambda tok, name, _a=action: self.manage(tok, name, _a),
                [token, self.target],
                outputs,
                api_visibility="private",
            )
        self.reset_button.click(
            self.reset,
            [token, self.target, self.reset_password],
            [*outputs, self.reset_password],
            api_visibility="private",
        )

    def _listing(self, admin: User, message: str = "", kind: str = "ok"):
        users = self.ctx.accounts.list_users(admin)
        return (
            html.notice(kind, message),
            users_frame(users, time.time()),
            gr.update(choices=[u.username for u in users]),
        )

    def refresh(self, token):
        try:
            return self._listing(self.ctx.sessions.admin(token))
        except Exception as exc:
            return html.notice("error", friendly(exc, "user management")), None, gr.update()

    def create(self, token, name, password, role):
        try:
            admin = self.ctx.sessions.admin(token)
            user = self.ctx.accounts.create_user(admin, name or "", password or "", role or "")
        except Exception as exc:
            return (
                html.notice("error", friendly(exc, "user management")),
                gr.update(),
                gr.update(),
                gr.update(),
                gr.update(),
            )
        return (*self._listing(admin, f"Account {user.username!r} ({user.role}) created."), "", "")

    def manage(self, token, name, action: str):
        try:
            admin = self.ctx.sessions.admin(token)
            if not name:
                raise InvalidInput("Choose a user first.")
            if action == "unlock":
                user = self.ctx.accounts.unlock(admin, name)
            else:
                user = self.ctx.accounts.set_active(admin, name, action == "enable")
        except Exception as exc:
            return html.notice("error", friendly(exc, "user management")), gr.update(), gr.update()
        return self._listing(admin, f"Account {user.username!r}: {action}d.")

    def reset(self, token, name, password):
        try:
            admin = self.ctx.sessions.admin(token)
            if not name:
                raise InvalidInput("Choose a user first.")
            user = self.ctx.accounts.reset_password(admin, name, password or "")
        except Exception as exc:
            return (
                html.notice("error", friendly(exc, "user management")),
                gr.update(),
                gr.update(),
                gr.update(),
            )
        return (*self._listing(admin, f"Password of {user.username!r} reset."), "")
