"""A layer worker that takes a while to start:
``python -m tests.helpers.slow_layer SECONDS INDEX [worker options]``."""
import sys
import time

if __name__ == "__main__":
    time.sleep(float(sys.argv.pop(1)))
    from asyncdni.workers._entry import main
    sys.exit(main("layer"))
