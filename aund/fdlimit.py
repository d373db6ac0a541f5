"""Process layer: the open-file limit (RLIMIT_NOFILE) a daemon holding many links needs.

Every gateway link is one TCP socket; the app socket, its connections, the inbox database, the
identity store and trio's own wake-up fds come on top. At start `ensure_nofile(needed)` raises
the soft limit to the hard limit when the soft one is lower than what the configured identities
need (raising the soft limit up to the hard one needs no privilege), and returns a `NofileCheck`
that says whether the result is enough. The caller logs one line when it is not, naming
systemd's `LimitNOFILE=` (which sets the hard limit of a service).

Imports the stdlib only (and `resource`, which exists wherever aund runs: Linux).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: fds besides the links: listening and app sockets, inbox and store files, trio's wake-up pipes,
#: DNS and HTTP side requests (agent.md, discovery), log and config files.
MARGIN = 256
#: sockets per link beyond its own WebSocket (a token refresh or login opens a second one briefly).
PER_LINK = 1


def needed(links: int, apps: int = 0) -> int:
    """The fds `links` gateway links and `apps` app connections need, with the margin."""
    return max(0, links) * PER_LINK + max(0, apps) + MARGIN


@dataclass(frozen=True)
class NofileCheck:
    needed: int
    soft_before: int
    soft: int
    hard: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed

    @property
    def raised(self) -> bool:
        return self.soft != self.soft_before

    def log_fields(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {"needed": self.needed, "soft": self.soft, "hard": self.hard}
        if not self.enough:
            out["hint"] = (f"raise the hard limit of open files to at least {self.needed}: LimitNOFILE="
                           f"{suggested(self.needed)} in the systemd unit (or `ulimit -Hn` where aund is started)")
        return out


def suggested(need: int) -> int:
    """A LimitNOFILE= value for `need`: the next power of two, at least 65536."""
    value = 65536
    while value < need:
        value *= 2
    return value


def _infinite(value: int, infinity: int) -> bool:
    return value == infinity or value < 0


def ensure_nofile(need: int, *, getrlimit: Callable[[int], tuple[int, int]] | None = None,
                  setrlimit: Callable[[int, tuple[int, int]], None] | None = None) -> NofileCheck:
    """Raise the soft RLIMIT_NOFILE towards the hard limit if it is below `need` (to the hard
    limit itself, capped where the hard limit is unlimited); never lowers it. A refused raise
    (OSError, ValueError) leaves the limit as it was. `getrlimit`/`setrlimit` default to the
    `resource` module's (tests inject their own)."""
    import resource

    get = getrlimit or resource.getrlimit
    set_ = setrlimit or resource.setrlimit
    which = resource.RLIMIT_NOFILE
    soft, hard = get(which)
    infinity = resource.RLIM_INFINITY
    if _infinite(soft, infinity):
        return NofileCheck(need, soft, max(need, 1 << 30), max(need, 1 << 30))
    target = soft
    if soft < need:
        target = max(need, suggested(need)) if _infinite(hard, infinity) else hard
    if target != soft:
        try:
            set_(which, (target, hard))
        except (OSError, ValueError):
            target = soft
    return NofileCheck(need, soft, target, hard if not _infinite(hard, infinity) else max(target, 1 << 30))
