"""A layer worker that raises at a chosen step:
``python -m tests.helpers.faulty_layer INDEX --fail-step N [worker options]``."""
import sys

from asyncdni.numerics import layer


def main():
    i = sys.argv.index("--fail-step")
    fail_step = int(sys.argv[i + 1])
    del sys.argv[i:i + 2]
    original = layer.LayerNode.dni_forward

    def dni_forward(self, step, x, y):
        if step == fail_step:
            raise ZeroDivisionError(f"injected failure at step {step}")
        return original(self, step, x, y)

    layer.LayerNode.dni_forward = dni_forward
    from asyncdni.workers._entry import main as entry
    return entry("layer")


if __name__ == "__main__":
    sys.exit(main())
