"""From notebook to app: find the endpoints of a .py, a package or an .ipynb without running
it (``discover``), build their environments ahead of time (``build``), register them with the
control plane as HTTP-callable endpoints (``deploy``), and serve them as a local web app
(``devserver``). The ``flash-jupyter`` subcommands are in ``commands``."""
