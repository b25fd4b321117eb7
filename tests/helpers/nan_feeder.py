"""A feeder whose batch at a chosen step has one NaN pixel, as if the dataset held one:
``python -m tests.helpers.nan_feeder --nan-step N [worker options]``."""
import sys

from asyncdni.numerics import data


def main():
    i = sys.argv.index("--nan-step")
    nan_step = int(sys.argv[i + 1])
    del sys.argv[i:i + 2]
    original = data.BatchStream.batch

    def batch(self, step):
        x, y = original(self, step)
        if step == nan_step:
            x = x.copy()
            x[0, 0] = float("nan")
        return x, y

    data.BatchStream.batch = batch
    from asyncdni.workers._entry import main as entry
    return entry("feeder")


if __name__ == "__main__":
    sys.exit(main())
