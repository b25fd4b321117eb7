"""One layer worker: ``python -m workers.layer INDEX --control tcp://HOST:PORT [...]``."""
import sys

from workers._entry import main

if __name__ == "__main__":
    sys.exit(main("layer"))
