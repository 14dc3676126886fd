"""`python -m dynkv.worker ... -- <vllm argv>`: see dynkv.worker.wrapper."""

import sys

from dynkv.worker.wrapper import main

sys.exit(main())
