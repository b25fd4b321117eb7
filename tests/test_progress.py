"""report.Progress (unit, no processes): a tqdm bar on a terminal, a line per 10% otherwise,
and interjected lines that never run into the bar."""
import io
import re

from asyncdni import report


class Tty(io.StringIO):
    def isatty(self):
        return True


def _feed(p, total, every, start=0, loss=0.5):
    for done in range(start, total + 1, every):
        p({"done": done, "total": total, "loss": loss, "elapsed": 0.01 * (done + 1)})


def test_not_a_terminal_prints_one_line_per_tenth():
    out = io.StringIO()
    p = report.Progress("async", stream=out)
    _feed(p, 1000, 7)
    p({"done": 1000, "total": 1000, "loss": 0.25, "elapsed": 10.0})
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11, lines                           # 0%, 10%, ..., 100%
    assert lines[0].startswith("async: 0/1000 steps, loss 0.5000, ")
    assert lines[-1] == "async: 1000/1000 steps, loss 0.2500, 100 steps/s"
    done = [int(re.match(r"async: (\d+)/1000 steps", s).group(1)) for s in lines]
    assert [d * 10 // 1000 for d in done] == list(range(11))  # the first report of each tenth
    assert "\r" not in out.getvalue()


def test_disabled_prints_nothing_but_interjections():
    for out in (io.StringIO(), Tty()):
        p = report.Progress("async", stream=out, enabled=False)
        _feed(p, 100, 1)
        p.interject("asyncdni: restarting layer 2")
        p.close()
        assert out.getvalue() == "asyncdni: restarting layer 2\n"


def test_terminal_bar_with_an_interjected_line():
    out = Tty()
    p = report.Progress("backprop", stream=out)
    p({"done": 0, "total": 200, "loss": 1.0, "elapsed": 0.0})
    p.bar.mininterval = 0                                    # redraw on every report
    _feed(p, 100, 10, start=10)
    p.interject("asyncdni: layer 2 restarted")
    _feed(p, 200, 10, start=110, loss=0.125)
    p.close()
    p.close()                                                # idempotent
    text = out.getvalue()
    assert "\r" in text and "backprop" in text
    # the interjected line stands alone: the bar was cleared before it and redrawn after it
    line = [s for s in text.split("\n") if "restarted" in s]
    assert len(line) == 1 and line[0].split("\r")[-1] == "asyncdni: layer 2 restarted"
    last = text.rstrip("\n").split("\r")[-1]
    assert "200/200" in last and "loss 0.1250" in last and last.startswith("backprop")
    assert text.endswith("\n")                               # close() leaves the bar on its own line


def test_terminal_bar_of_a_resumed_run_starts_where_it_resumed():
    out = Tty()
    p = report.Progress("async", stream=out)
    p({"done": 600, "total": 1000, "loss": 0.5, "elapsed": 0.1})
    assert p.bar.n == 600 and p.bar.total == 1000
    p.close()
    assert "600/1000" in out.getvalue()
