"""The single-process runs that `asyncdni bench` compares against, the DNI math or plain
backprop (``bench.INPROCESS_ROWS``): ``python -m asyncdni.workers.inprocess CONFIG.json OUT.json [ROW]``.
It runs in a process of its own so that it gets the BLAS thread count the row asks for
(numpy fixes that at import), not whatever the coordinator's process has."""
import json
import sys

from asyncdni.workers._entry import pin_blas


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m asyncdni.workers.inprocess CONFIG.json OUT.json [ROW]", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        cfg_dict = json.load(f)
    pin_blas(cfg_dict["runtime"]["blas_threads"])
    from asyncdni import config
    from asyncdni import report
    from asyncdni.bench.compare import run_inprocess_here
    result = run_inprocess_here(config.from_dict(cfg_dict), *argv[2:])
    report.write_json(argv[1], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
