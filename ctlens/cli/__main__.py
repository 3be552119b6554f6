"""``python -m ctlens.cli ...`` runs the ``ctlens`` command, as ``python -m ctlens`` does."""

import sys

from ctlens.cli import main

sys.exit(main())
