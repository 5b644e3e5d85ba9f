"""The control plane. It never imports Jupyter and never unpickles user payloads."""
