"""A feeder that reports progress only at its first and last step (as if every report
were due just after a checkpoint): ``python -m tests.helpers.quiet_feeder [worker options]``."""
import sys

from asyncdni.engine import worker


def main():
    worker.PROGRESS_INTERVAL = 1e9
    from asyncdni.workers._entry import main as entry
    return entry("feeder")


if __name__ == "__main__":
    sys.exit(main())
