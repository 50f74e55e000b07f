import sys

from waldo_experiments.cli import main

sys.exit(main())
