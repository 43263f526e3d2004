"""``python -m fsam_fused.ops``: build (or verify) the C++ CPU backend ahead of time."""

import sys

from .cpp_build import main

sys.exit(main())
