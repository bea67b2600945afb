"""``python -m fleetmq``: the same as the ``fleetmq`` command."""

import sys

from fleetmq.cli import main

sys.exit(main())
