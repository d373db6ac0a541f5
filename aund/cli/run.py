"""`aund run`: the daemon. Config from file < env < flags; the seed only from the environment or
a systemd credential. SIGTERM/SIGINT: stop gracefully and exit 0. SIGHUP: re-read the
configuration (trust roots, identities, `[policy]`); a bad file or policy keeps the running one."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from aund.cli._common import only_error, say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (default /etc/aund/aund.toml if present)")
    p.add_argument("--state-dir", type=Path, help="where identities and the inbox live")
    p.add_argument("--socket", type=Path, help="the Unix socket apps connect to")
    p.add_argument("--gateway-url", action="append", help="gateway WebSocket URL (repeat for failover)")
    p.add_argument("--root-ca", action="append", type=Path, help="extra trusted AUN root CA (PEM)")
    p.add_argument("--identity", dest="identities", action="append", help="AID to keep connected (repeat)")


def run(args: argparse.Namespace) -> int:
    import os

    from aund import logs, systemd
    from aund.config import ConfigError, load

    # before the seed or any key is in memory: no core dumps, and every file we create is ours alone
    # (even when run by hand with a permissive umask)
    os.umask(0o077)
    try:
        systemd.forbid_core_dumps()
    except OSError as exc:
        say(f"aund run: cannot disable core dumps: {exc}", err=True)
        return 1
    flags = {"state_dir": args.state_dir, "socket": args.socket, "gateway_url": args.gateway_url,
             "root_ca": args.root_ca, "identities": args.identities}
    try:
        config = load(args.config, flags)
    except ConfigError as exc:
        say(f"aund run: {exc}", err=True)
        return 2
    logs.configure(level_name=config.log_level)
    import trio

    from aund.errors import AundError

    try:
        return trio.run(_main, config, (args.config, flags))
    except BaseException as exc:
        found = only_error(exc, AundError)  # also from inside the daemon's nursery (a damaged inbox, ...)
        if found is None:
            raise
        say(f"aund run: {found}", err=True)
        return 1


async def _main(config, reload_from: tuple) -> int:
    """The daemon, the app socket and systemd, until SIGTERM/SIGINT; SIGHUP reloads from
    `reload_from` (the config file and command-line flags the daemon was started with)."""
    import structlog
    import trio

    from aund import systemd
    from aund.aun import transport
    from aund.aun.trust import GatewayTrust
    from aund.broker import Limits
    from aund.broker.sockets import (
        BoundPath, DaemonAlreadyRunning, SocketPathInUse, UnsafeSocketPath, activated_listeners, bind_unix,
    )
    from aund.daemon import Supervisor
    from aund.errors import InvalidParams
    from aund.identity.store import IdentityStore, StateLock, load_seed

    log = structlog.get_logger("aund")
    check_open_files(log, len(config.identities))
    tune_gc()
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with StateLock(config.state_dir):
        policy = build_policy(config)
        try:
            limits = Limits.from_table(dict(config.limits))
            if "global_calls" in config.limits and limits.global_calls < 2:
                raise ValueError("global_calls must be at least 2 (one call is kept for the daemon's own work)")
        except ValueError as exc:
            raise InvalidParams(f"config: limits: {exc}") from None
        seed = load_seed()
        store = await trio.to_thread.run_sync(IdentityStore, config.state_dir, seed)
        await trio.to_thread.run_sync(store.verify_seed)
        trust = GatewayTrust.from_files(list(config.root_ca), config.state_dir)
        transport.use_dns_cache(config.state_dir / "dns-cache.json")
        # listen early (socket activation, or bind now: refuses if a live daemon answers there)
        listeners = activated_listeners()
        bound = None
        if not listeners:
            try:
                listeners = [bind_unix(config.socket)]
            except (DaemonAlreadyRunning, SocketPathInUse) as exc:
                raise InvalidParams(f"socket {config.socket}: {exc}") from None
            except UnsafeSocketPath as exc:
                raise InvalidParams(f"refusing to listen on {config.socket}: {exc}") from None
            except OSError as exc:
                where = f" ({exc.filename})" if exc.filename else ""
                raise InvalidParams(f"cannot listen on {config.socket}: {exc.strerror or exc}{where}; "
                                    f"pass --socket or set XDG_RUNTIME_DIR") from None
            bound = BoundPath.of(config.socket)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    supervisor = await nursery.start(Supervisor(
                        config, store, trust, policy=policy, limits=limits, listeners=listeners,
                        configured_limits=set(config.limits)).run)
                    nursery.start_soon(_systemd_pings, supervisor)
                    log.info("daemon.started", state_dir=str(config.state_dir), socket=str(config.socket),
                             activated=bound is None, identities=len(config.identities),
                             gateways=list(config.gateway_url))
                    systemd.notify("READY=1", f"STATUS={supervisor.summary()}")
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            _reload(supervisor, log, reload_from)
                            continue
                        log.info("daemon.stopping", signal=signal.Signals(signum).name)
                        systemd.notify("STOPPING=1", "STATUS=stopping")
                        await supervisor.stop(config.shutdown_grace)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            if bound is not None:
                bound.unlink_if_ours()
            for listener in listeners:
                await trio.aclose_forcefully(listener)
    log.info("daemon.stopped")
    return 0


#: Python's cyclic GC: young collections every 50,000 allocations (not 700), a full one only after
#: 100 of the next (and the heap grew by a quarter). With 10,000 links the heap holds millions of
#: objects; the default thresholds made full collections take ~75% of the trio thread while the
#: links connected (py-spy --native: gc_collect_main under the websocket readers).
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Freeze what the imports made (modules, classes: never garbage) out of every collection,
    and collect less often (GC_THRESHOLDS)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def check_open_files(log, links: int) -> None:
    """Raise the soft open-file limit if the configured links need more; one log line if even
    the hard limit is too low (the unit's LimitNOFILE=)."""
    from aund import fdlimit

    check = fdlimit.ensure_nofile(fdlimit.needed(links))
    if not check.enough:
        log.warning("daemon.nofile_too_low", links=links, **check.log_fields())
    elif check.raised:
        log.info("daemon.nofile_raised", links=links, **check.log_fields())


def build_policy(config):
    """The `[policy]` of `config`, validated (at start and at every SIGHUP alike).

    Errors: InvalidParams naming the rule (a malformed entry, an unknown user or group)."""
    from aund.broker import Policy
    from aund.errors import InvalidParams

    try:
        return Policy(config.policy)
    except ValueError as exc:
        raise InvalidParams(f"config: policy: {exc}") from None


def _reload(supervisor, log, reload_from: tuple) -> None:
    """SIGHUP: re-read the configuration and the policy; a bad file or policy keeps the running
    configuration (all of it) and is logged."""
    import time

    from aund import systemd
    from aund.config import ConfigError, load
    from aund.errors import AundError

    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1_000_000)}")
    try:
        config = load(*reload_from)
        supervisor.reload(config, build_policy(config))
    except (ConfigError, AundError) as exc:
        log.error("daemon.reload_failed", error=str(exc))
    finally:
        systemd.notify("READY=1", f"STATUS={supervisor.summary()}")


async def _systemd_pings(supervisor) -> None:
    """WATCHDOG=1 at half the watchdog period (when systemd asks for it) and STATUS= updates."""
    import trio

    from aund import systemd

    interval = systemd.watchdog_interval()
    period = min(interval, 10.0) if interval else 10.0
    last_status = ""
    while True:
        if interval:
            systemd.notify("WATCHDOG=1")
        status = supervisor.summary()
        if status != last_status:
            systemd.notify(f"STATUS={status}")
            last_status = status
        await trio.sleep(period)

