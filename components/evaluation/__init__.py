"""Held-out evaluation: metrics (`metrics.evaluate`), batched inference (`predict`), figures
(`plots`). Submodules are imported on demand so this package stays light."""
