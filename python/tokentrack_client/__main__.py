"""``python -m tokentrack_client``: the same as the ``tokentrack`` command."""

import sys

from tokentrack_client.cli import main

sys.exit(main())
