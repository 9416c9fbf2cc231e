"""`python -m service.devstack [DATA_DIR]`: run both servers until Ctrl-C."""

import sys

from service.devstack.servers import _main

raise SystemExit(_main(sys.argv[1:]))
