"""Jupyter integration: the %%flash / %flash magics (more: widgets, server extension)."""
