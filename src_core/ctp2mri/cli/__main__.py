"""``python -m ctp2mri.cli``: how torchrun and the tests launch the command line."""

import sys

from ctp2mri.cli.main import main

sys.exit(main())
