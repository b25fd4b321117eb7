"""A worker's timeline: the codes of its entries and how many it keeps. The workers write
them; ``report.chrome_trace`` names them."""
TRACE_CODES = {"forward": 0, "backward": 1, "eval": 2, "wait": 3}
TRACE_NAMES = {code: name for name, code in TRACE_CODES.items()}
TRACE_LIMIT = 200_000           # timeline events kept per worker
