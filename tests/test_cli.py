"""The command line's shape: no abbreviations, --version, grouped help."""
from __future__ import annotations

import pytest

from asyncdni import __version__, cli


def test_abbreviations_are_refused(capsys):
    """'--delay 5' once read as '--delay-remedy 5' (argparse's prefix matching)."""
    with pytest.raises(SystemExit) as e:
        cli.make_parser().parse_args(["bench", "--lab", "--delay-rem", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --delay-rem none" in err and len(err.strip().splitlines()) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.make_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"asyncdni {__version__}" and __version__ != "0+unknown"


def test_help_is_grouped(capsys):
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    starts = [out.index(f"\n{g}:\n") for g in cli.HELP_GROUPS]
    assert starts == sorted(starts)                        # every group, in order
    assert out.index("\n  --sg-lr") > out.index("\nsynthetic gradients:\n") > out.index("\n  --layers")
    assert out.index("\n  --listen") > out.index("\nacross machines:\n")


@pytest.mark.parametrize("field, group", [("model.layers", "model"), ("train.sg_lr", "synthetic gradients"),
                                          ("train.max_inflight", "schedule"), ("runtime.listen", "across machines"),
                                          ("runtime.checkpoint_every", "runtime"), ("train.lr", "training")])
def test_help_group_of_a_field(field, group):
    assert cli.help_group(field) == group
