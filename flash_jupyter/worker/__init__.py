"""The worker process. It speaks the wire to the control plane and never imports the server."""
