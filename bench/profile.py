"""Sample a running broker with py-spy, and read the samples as the top functions by own and total time.

    with Sampler(pid, Path("first.txt")):      # py-spy record --format raw --nolineno --nonblocking
        ...                                   # the load to profile
    python -m bench.profile first.txt [--top 15]

py-spy is a development tool, not a dependency: ``.venv/bin/pip install py-spy``. The raw
format is one line per distinct stack, ``frame;frame;...;leaf count``, outermost first.
*Own* time is the samples whose leaf is the function, *total* time those with the function
anywhere on the stack (once per stack, however deeply it recurses).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Profile", "Sampler", "read_raw"]


@dataclass(frozen=True)
class Profile:
    samples: int
    own: Counter[str]
    total: Counter[str]

    def table(self, top: int = 15) -> str:
        lines = [f"{self.samples} samples"]
        for title, counts in (("own", self.own), ("total", self.total)):
            lines.append(f"-- top {top} by {title} time")
            for name, count in counts.most_common(top):
                lines.append(f"{100 * count / max(1, self.samples):6.1f}%  {name}")
        return "\n".join(lines)


def read_raw(text: str) -> Profile:
    """A py-spy ``--format raw`` file as own and total samples per function."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return Profile(samples, own, total)


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    return found


class Sampler:
    """``py-spy record`` on ``pid`` for the duration of the block, raw samples into ``output``."""

    def __init__(self, pid: int, output: Path, *, rate: int = 250) -> None:
        self._argv = [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--nolineno",
            "--nonblocking",
            "--rate",
            str(rate),
            "--output",
            str(output),
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sampler:
        self._process = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, nargs="+", help="py-spy --format raw files")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.raw:
        print(f"== {path}")
        print(read_raw(path.read_text()).table(args.top))


if __name__ == "__main__":
    main()
