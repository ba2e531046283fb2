"""Audit (admins): the hash-chained audit log, whether its chain is intact, CSV/JSON export."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from components.audit import export
from ui import html
from ui.context import UiContext
from ui.messages import friendly

SHOWN = 500
COLUMNS = ["#", "Time (UTC)", "User id", "Role", "Action", "Case #", "Details", "Hash"]


def entries_frame(entries) -> pd.DataFrame:
    rows = [
        [
            e.seq,
            e.ts.replace("T", " ")[:19],
            "" if e.actor_id is None else e.actor_id,
            e.actor_role or "",
            e.action,
            "" if e.case_id is None else e.case_id,
            "" if e.details == "{}" else e.details,
            e.hash[:12] + "…",
        ]
        for e in entries
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


class AuditPage:
    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx
        self.exports_dir = Path(tempfile.mkdtemp(prefix="oncoflow-ui-audit-"))

    def build(self, token: gr.State) -> None:
        with gr.Row():
            self.refresh_button = gr.Button(
                "Refresh and verify", variant="primary", scale=0, elem_id="of-audit-refresh"
            )
            self.format = gr.Radio(["csv", "json"], value="csv", label="Export format", scale=1)
            self.export_button = gr.Button("Prepare export", scale=0, elem_id="of-audit-export")
            self.download = gr.DownloadButton(
                "Download", visible=False, scale=0, elem_id="of-audit-download"
            )
        self.status = gr.HTML(elem_id="of-audit-status")
        self.table = gr.Dataframe(
            value=pd.DataFrame(columns=COLUMNS),
            elem_classes="of-table",
            interactive=False,
            wrap=True,
            elem_id="of-audit",
            max_height=520,
        )
        gr.Markdown(
            "Every sign-in, prediction, explanation, similar-case query, report download, "
            "review, release, invitation, question, answer, feedback, export and account "
            "change, newest first. User ids and the UI's case numbers only: no names, notes, "
            "questions or images. Each entry's hash covers the one before it, so an edited, "
            "deleted or reordered entry breaks the chain (`oncoflow audit verify`)."
        )
        self.inputs, self.outputs = [token], [self.status, self.table]
        self.refresh_button.click(self.refresh, self.inputs, self.outputs, api_visibility="private")
        self.export_button.click(
            self.export,
            [token, self.format],
            [self.download, self.status],
            api_visibility="private",
        )

    def refresh(self, token):
        try:
            self.ctx.sessions.admin(token)
            result = self.ctx.audit.verify()
            entries = self.ctx.audit.entries(limit=SHOWN, newest_first=True)
        except Exception as exc:
            return html.notice("error", friendly(exc, "the audit log")), gr.update()
        if result.ok:
            status = html.notice(
                "ok",
                f"Chain intact: {result.entries} entries; head {result.head[:16]}… "
                f"(showing the newest {min(SHOWN, result.entries)}).",
            )
        else:
            status = html.notice(
                "error",
                f"The audit log is broken at entry {result.broken_seq}: {result.reason}. "
                "Keep the database as it is and inform information governance.",
            )
        return status, entries_frame(entries)

    def export(self, token, fmt):
        try:
            admin = self.ctx.sessions.admin(token)
            fmt = fmt if fmt in ("csv", "json") else "csv"
            text = export(self.ctx.audit.entries(), fmt)
            self.ctx.audit.record(admin, "audit.export", details={"format": fmt})
        except Exception as exc:
            return gr.update(visible=False), html.notice("error", friendly(exc, "the export"))
        for old in self.exports_dir.glob("audit-log.*"):
            old.unlink(missing_ok=True)
        path = self.exports_dir / f"audit-log.{fmt}"
        path.write_text(text)
        return gr.update(value=str(path), visible=True), html.notice(
            "ok", "The export is ready: use “Download”."
        )
