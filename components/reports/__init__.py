"""Human-readable reports for one case (PDF)."""

from __future__ import annotations
