"""Sanitised reasons: why a site failed, refused, timed out or was rejected, in words that are
safe to keep at the coordinator (ledger, result, logs, MLflow tags, `oncoflow fl status`).

A site's error reply carries the text of whatever exception its ClientApp raised (Flower sends
`"<class 'pkg.Name'>:<'message'>"`, the inline engine `"Name: message"`). That text can hold
file paths or, from a third-party library, data. What is kept:

- oncoflow's own errors (`components.*`, the `OncoflowError` family, `PrivacyBudgetExceeded`):
  the class name and the message, with every path replaced by `<path>`;
- any other exception: its class name only;
- Flower's transport errors (node or reply unavailable): a fixed sentence.

A `SiteReason` is a short category (`timeout`, `unavailable`, `refused`, `site_data`,
`site_error`, `rejected`, `secagg_dropout`, `duplicate`, `server_error`, `stopped`,
`interrupted`: the run was lost with its ServerApp, e.g. a SuperLink restart) and a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_MESSAGE = 240
PATH = "<path>"

_FLOWER_FORMAT = re.compile(r"^<class '(?P<qualname>[\w.]+)'>:<'(?P<message>.*)'>$", re.S)
_INLINE_FORMAT = re.compile(r"^(?P<qualname>[A-Za-z_][\w.]*): (?P<message>.*)$", re.S)
# a token with a slash or backslash in it (POSIX, Windows and relative paths, URLs)
_PATH_TOKEN = re.compile(r"""[^\s'"`()\[\]{}<>,;]*[\\/][^\s'"`()\[\]{}<>,;]*""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_REFUSED = "refused by site: "  # protocol.REFUSED_PREFIX of a site's refusal reply


@dataclass(frozen=True)
class SiteReason:
    """One sanitised reason: a short category and a message safe to keep and show."""

    category: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.category}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"category": self.category, "message": self.message}


def scrub(text: str, limit: int = MAX_MESSAGE, *, paths: bool = True) -> str:
    """`text` on one line, at most `limit` characters; with `paths`, every token with a slash
    in it (a path, a URL) replaced by `<path>`."""
    cleaned = _CONTROL.sub(" ", str(text)).strip()
    if paths:
        cleaned = _PATH_TOKEN.sub(PATH, cleaned)
    cleaned = re.sub(r"\s+", " ", cleaned)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def outgoing_error(exc: BaseException) -> str:
    """What a site sends the coordinator about its own exception (`Message.error.reason`):
    the exception's class, and its message only for oncoflow's own errors (scrubbed of paths);
    a foreign exception's text may carry data and stays in the site's own log."""
    qualname = f"{type(exc).__module__}.{type(exc).__qualname__}"
    message = scrub(str(exc)).replace("'", "") if _is_ours(qualname) else ""
    return f"<class '{qualname}'>:<'{message}'>"


def _oncoflow_error_names() -> set[str]:
    from components.errors import OncoflowError

    names, todo = set(), [OncoflowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names | {"PrivacyBudgetExceeded"}


def _is_ours(qualname: str) -> bool:
    name = qualname.rsplit(".", 1)[-1]
    return qualname.startswith("components.") or name in _oncoflow_error_names()


def site_error(raw: str) -> SiteReason:
    """The sanitised reason of a site's error reply (`Message.error.reason`)."""
    raw = str(raw or "").strip()
    lowered = raw.lower()
    if "node unavailable" in lowered:
        return SiteReason(
            "unavailable", "Node Unavailable: the site stopped answering (no heartbeat)"
        )
    if "message unavailable" in lowered:
        return SiteReason("timeout", "the site's reply expired or never arrived")
    if raw.startswith(_REFUSED):  # a site's own refusal (approval, its maximum ε, ...)
        return SiteReason("refused", scrub(raw[len(_REFUSED) :]))
    match = _FLOWER_FORMAT.match(raw) or _INLINE_FORMAT.match(raw)
    if match is None:
        return SiteReason("site_error", "the site reported an error (details stay at the site)")
    qualname, message = match["qualname"], match["message"]
    name = qualname.rsplit(".", 1)[-1]
    if not _is_ours(qualname):
        return SiteReason("site_error", f"the site's ClientApp raised {name}")
    if "Refus" in name or "BudgetExceeded" in name:
        category = "refused"
    elif name in ("DataError", "ValidationFailed"):
        category = "site_data"
    else:
        category = "site_error"
    return SiteReason(category, scrub(f"{name}: {message}"))


_SERVER_PREFIXES = (
    ("no reply within", "timeout"),
    ("a second reply from the same site", "duplicate"),
    ("tensor names differ", "rejected"),
    ("wrong shape", "rejected"),
    ("non-finite", "rejected"),
    ("update norm", "rejected"),
)
_NO_UPDATE = "no update: "
_SECAGG = re.compile(r"^dropped out of SecAgg\+ at stage '(?P<stage>[\w\- ]*)': (?P<why>.*)$", re.S)


def classify(reason: str) -> SiteReason:
    """The sanitised form of a `Rejection.reason` written by the round driver."""
    reason = str(reason or "")
    if reason.startswith(_NO_UPDATE):
        return site_error(reason[len(_NO_UPDATE) :])
    secagg = _SECAGG.match(reason)
    if secagg:
        inner = site_error(secagg["why"])
        return SiteReason(
            "secagg_dropout",
            f"dropped out of SecAgg+ at stage '{secagg['stage']}': {inner.message}",
        )
    for prefix, category in _SERVER_PREFIXES:
        if reason.startswith(prefix):  # composed by the driver from numbers and tensor names
            return SiteReason(category, scrub(reason, paths=False))
    # a reason the driver has already sanitised ("category: message") is kept as it is
    category, _, message = reason.partition(": ")
    if category in CATEGORIES and message:
        return SiteReason(category, scrub(message, paths=False))
    return SiteReason("rejected", scrub(reason))


def server_error(exc: BaseException) -> SiteReason:
    """Why the coordinator's own round driver stopped (oncoflow errors keep their message)."""
    name = type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return SiteReason("server_error", "interrupted")
    if _is_ours(f"{type(exc).__module__}.{name}"):
        return SiteReason("server_error", scrub(f"{name}: {exc}"))
    return SiteReason("server_error", f"the round driver raised {name}")


CATEGORIES = (
    "timeout",
    "unavailable",
    "refused",
    "site_data",
    "site_error",
    "rejected",
    "secagg_dropout",
    "duplicate",
    "server_error",
    "stopped",
    "interrupted",
)

__all__ = [
    "CATEGORIES",
    "SiteReason",
    "classify",
    "outgoing_error",
    "scrub",
    "server_error",
    "site_error",
]
