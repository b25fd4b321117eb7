"""The feeder worker: ``python -m workers.feeder --control tcp://HOST:PORT [...]``."""
import sys

from workers._entry import main

if __name__ == "__main__":
    sys.exit(main("feeder"))
