"""Print saved ``mimicshield bench --json-out`` files as Markdown tables (for BENCHMARKS.md):
every measured row, then issue 4's targets against them.

python scripts/bench_markdown.py out/gpu-bench/bench_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mimicshield.bench import markdown_table, targets_table


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(path).read_text()) for path in paths]
    for report in reports:
        env = report["environment"]
        print(
            f"- `{env.get('command', '?')}`: {env['device_name']}, {env['date']}, torch "
            f"{env['torch']}, diffusers {env['diffusers']}, attention {env.get('attention')}"
        )
    print()
    print(markdown_table(reports))
    print()
    print(targets_table(reports))


if __name__ == "__main__":
    main(sys.argv[1:])
