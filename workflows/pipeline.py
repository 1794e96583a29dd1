"""The Ray job: ``ray job submit --working-dir . -- python workflows/pipeline.py --config RECIPE``.

Same as ``medvl pipeline``; see ``medvl pipeline --help`` and medvl/pipeline.py.
"""

import sys

from medvl.cli import main

if __name__ == "__main__":
    main(["pipeline", *sys.argv[1:]])
