"""The one training loop of oncoflow (Lightning): central training and per-site local fits.

Submodules: `loop` (the shared loop, `fit_local`), `central` (`train_classifier`,
`train_central`), `assembly` (architecture, preprocessing, augmentation from the config),
`datamodule`, `module`. This package stays import-light so `components` can be imported
without torch.
"""
