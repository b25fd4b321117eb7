"""The feeder worker: ``python -m workers.feeder SPEC.json``."""
import sys

from workers._entry import main

if __name__ == "__main__":
    sys.exit(main("feeder"))
