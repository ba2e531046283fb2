"""The clinician web UI (Gradio): accounts, diagnosis, history, analytics, model card, assistant.

It talks to the diagnosis service only over HTTP (`serving.client`) and never imports torch or
`components/`, so it runs against any deployed service. Start it with ``python -m ui`` or
``oncoflow ui``.
"""
