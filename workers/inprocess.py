"""The single-process run of the DNI math that `asyncdni bench` compares against:
``python -m asyncdni.workers.inprocess CONFIG.json OUT.json``. It runs in a process of its own so
that it gets the same BLAS thread count as a layer worker (numpy fixes that at import),
not whatever the coordinator's process has."""
import json
import sys

from asyncdni.workers._entry import pin_blas


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m asyncdni.workers.inprocess CONFIG.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        cfg_dict = json.load(f)
    pin_blas(cfg_dict["runtime"]["blas_threads"])
    from asyncdni import config, report
    from asyncdni.bench import run_inprocess_here
    result = run_inprocess_here(config.from_dict(cfg_dict))
    report.write_json(argv[1], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
