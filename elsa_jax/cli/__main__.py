"""``python -m elsa_jax.cli``: the same as the ``elsa-jax`` command."""

import sys

from elsa_jax.cli.commands import main

sys.exit(main())
