"""A layer worker that raises at a chosen step: ``python -m tests.helpers.faulty_layer SPEC INDEX FAIL_STEP``."""
import sys

from asyncdni import layer


def main():
    fail_step = int(sys.argv.pop(3))
    original = layer.LayerNode.dni_forward

    def dni_forward(self, step, x, y):
        if step == fail_step:
            raise ZeroDivisionError(f"injected failure at step {step}")
        return original(self, step, x, y)

    layer.LayerNode.dni_forward = dni_forward
    from workers._entry import main as entry
    return entry("layer")


if __name__ == "__main__":
    sys.exit(main())
