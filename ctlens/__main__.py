"""``python -m ctlens ...`` runs the ``ctlens`` command (for example under ``torchrun -m``)."""

import sys

from ctlens.cli import main

sys.exit(main())
