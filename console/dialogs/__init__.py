"""Modal dialogs the app opens: help, a yes/no confirmation, and the new-run form."""
