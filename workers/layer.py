"""One layer worker: ``python -m asyncdni.workers.layer INDEX --control tcp://HOST:PORT [...]``."""
import sys

from asyncdni.workers._entry import main

if __name__ == "__main__":
    sys.exit(main("layer"))
