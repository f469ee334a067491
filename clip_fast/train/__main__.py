"""`python -m clip_fast.train`."""
import sys

from clip_fast.train import main

sys.exit(main())
