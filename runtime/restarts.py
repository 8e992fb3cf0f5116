"""Training that survives a lost rank: numbered checkpoints, resuming from the newest, and saying who was lost.

Takes a directory and a compiled model (`autopar run --save-every K --resume DIR --max-restarts N`);
gives `Checkpoints`, which saves `DIR/step-000012` every K steps, points `DIR/latest` at it
(written to a temporary file, then renamed over the old pointer) and prunes the older ones, and
which resumes from the newest whole one after torchrun restarted the job.

When a rank dies, torchrun stops the others with SIGTERM (and, with --max-restarts, starts them
all again). `name_lost_ranks_on_sigterm` turns that signal into a `RankFailure` naming the ranks whose
heartbeat stopped (`World.failure`), so each surviving rank exits non-zero saying which rank was
lost, rather than vanishing.

`crash_if_asked` is a testing aid: AUTOPAR_CRASH="<rank>:<step>" makes that rank exit (code 17)
as that step begins, on the job's first attempt only (TORCHELASTIC_RESTART_COUNT 0), so that a
restarted job runs through.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

from autopar.runtime import checkpoint
from autopar.runtime.checkpoint_format import write_file

CRASH = "AUTOPAR_CRASH"
_NUMBERED = re.compile(r"^step-(\d+)$")


class Checkpoints:
    """Numbered checkpoints in one directory, the newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep: found {keep}, required >= 1 checkpoint")
        self.directory, self.keep = Path(directory), keep

    def latest(self) -> Path | None:
        """The newest whole checkpoint: the one `latest` names, else the highest-numbered with a manifest."""
        pointer = self.directory / "latest"
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if _NUMBERED.match(named.name) and (named / checkpoint.MANIFEST).is_file():
                return named
        found = sorted(self._numbered(), key=lambda p: int(_NUMBERED.match(p.name).group(1)))
        return next((p for p in reversed(found) if (p / checkpoint.MANIFEST).is_file()), None)

    def resume(self, model) -> tuple[int, Path] | None:
        """Load the newest checkpoint into `model`: its step count and path, or None when there is none."""
        path = self.latest()
        return None if path is None else (model.load(path), path)

    def save(self, model) -> Path:
        """`DIR/step-<model.step_count>`, then the pointer, then the older ones pruned. Every rank calls."""
        path = model.save(self.directory / f"step-{model.step_count:06d}")
        checkpoint.on_rank_zero(lambda: self._point_to(path), model)
        return path

    def _point_to(self, path: Path) -> None:
        write_file(self.directory / "latest.tmp", path.name + "\n")
        os.replace(self.directory / "latest.tmp", self.directory / "latest")
        self._prune(keep={path})

    def _numbered(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if p.is_dir() and _NUMBERED.match(p.name)]

    def _prune(self, keep: set[Path]) -> None:
        """All but the newest `keep` (and `keep`'s own), and what interrupted saves left."""
        newest = sorted(self._numbered(), key=lambda p: int(_NUMBERED.match(p.name).group(1)))[-self.keep:]
        for p in self._numbered() + list(self.directory.glob(".step-*.partial")):
            if p not in keep and p not in newest:
                shutil.rmtree(p, ignore_errors=True)


def crash_if_asked(rank: int, step: int) -> None:
    """Testing aid: exit (code 17) as `step` begins when AUTOPAR_CRASH is "<rank>:<step>" on the first attempt."""
    asked = os.environ.get(CRASH)
    if not asked or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    match = re.fullmatch(r"(\d+):(\d+)", asked.strip())
    if match is None:
        raise ValueError(f"{CRASH}: found {asked!r}, required <rank>:<step> (e.g. 1:3)")
    if (int(match.group(1)), int(match.group(2))) == (rank, step):
        print(f"rank {rank}: {CRASH}={asked}: exiting as step {step} begins (a testing aid)", file=sys.stderr,
              flush=True)
        os._exit(17)


class _Stopped(Exception):
    """The launcher sent SIGTERM: another rank failed."""


def name_lost_ranks_on_sigterm(world, doing: str = "training") -> None:
    """For the rest of this process (a rank of `autopar run`): SIGTERM, torchrun stopping the job
    after a rank died, raises a `RankFailure` naming the ranks whose heartbeat stopped. Main thread only."""
    def stopped(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report takes a moment
        raise world.failure(doing, _Stopped("the launcher stopped this rank (SIGTERM)"))

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stopped)


def add_args(parser, *, launcher: bool) -> None:
    """--save-every, --resume and (for the launcher) --max-restarts."""
    parser.add_argument("--save-every", type=int, default=None, metavar="K",
                        help="with --model: save a checkpoint into the --resume directory every K steps")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="with --model: resume from DIR's latest checkpoint when it has one (and save there)")
    if launcher:
        parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                            help="torchrun restarts the job up to N times after a rank fails; with --resume it "
                                 "continues from the last checkpoint (default: %(default)s)")


def rank_argv(args) -> list[str]:
    """The --save-every and --resume options for the ranks' command line, checked."""
    if args.save_every is not None and args.save_every < 1:
        raise ValueError(f"--save-every: found {args.save_every}, required >= 1 step")
    if args.save_every is not None and args.resume is None:
        raise ValueError("--save-every: found no --resume DIR, required one (the directory checkpoints go to)")
    if getattr(args, "max_restarts", 0) < 0:
        raise ValueError(f"--max-restarts: found {args.max_restarts}, required >= 0")
    return [*(["--save-every", str(args.save_every)] if args.save_every else []),
            *(["--resume", args.resume] if args.resume else [])]
