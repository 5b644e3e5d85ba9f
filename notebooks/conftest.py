"""nbval runs the example notebooks in a kernel started with this process's environment.
Live receipts (flash_jupyter.jupyter.receipts) show timings and costs that change from run
to run, so the checked outputs are made without them."""

import os

os.environ["FLASH_JUPYTER_RECEIPTS"] = "0"
