"""One module per tab of the app."""
