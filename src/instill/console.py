"""Two rich consoles: `console` (stderr) for progress and logs, `out` (stdout) for results.

Keeping logs off stdout lets `instill chat` and `--json` outputs be piped.
"""

from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)
