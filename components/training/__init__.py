"""The one training loop of oncoflow (Lightning): central training and per-site local fits.

Import from the submodules (`components.training.central`, `.datamodule`, `.module`); this
package stays import-light so `components` can be imported without torch.
"""
