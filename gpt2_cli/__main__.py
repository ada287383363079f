"""``python -m gpt2_cli`` = ``gpt2``."""

import sys

from gpt2_cli.main import main

sys.exit(main())
