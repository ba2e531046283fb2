"""HTTP serving: the BentoML diagnosis service, its packaging, launcher and typed client.

Import submodules directly; `serving.client` and `serving.schemas` need neither BentoML nor
torch, so the UI can use them.
"""
